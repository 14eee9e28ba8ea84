"""The quality gates through the pipeline's stage functions (what the flow steps call), on tiny models:
a reward model trained on random labels stops the run before RL; with that gate switched off, the
policy it produces is registered as `candidate` but not promoted; a policy that does not beat the
current champion is not promoted either. Decisions and numbers land in MLflow."""

from __future__ import annotations

import random

import pytest
from mlflow import MlflowClient

from rlhf_lightning import pipeline
from rlhf_lightning.evaluation import gates
from rlhf_lightning.serving import registry
from rlhf_lightning.config import from_dict
from rlhf_lightning.data.preprocess import PreparedData
from rlhf_lightning.models.generation import chat_prompt
from rlhf_lightning.models.loading import load_tokenizer
from test_reward_model import preference_rows  # noqa: E402 (tests dir is on sys.path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_label_rows(n: int, seed: int) -> list[dict]:
    """The learnable synthetic pairs with chosen/rejected swapped by a coin flip: labels carry no signal."""
    rng = random.Random(seed + 100)
    rows = preference_rows(n, seed)
    for row in rows:
        if rng.random() < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return rows


def cfg(min_eval_accuracy: float, ppo_learning_rate: float = 1e-2, **evaluation_cfg):
    return from_dict({
        "policy": {"model": "tiny:llama", "lora": {"r": 4, "alpha": 8}},
        "reward_model": {"backbone": "tiny:bert", "max_length": 48, "learning_rate": 3e-3, "batch_size": 8,
                         "epochs": 2, "min_eval_accuracy": min_eval_accuracy},
        "ppo": {"iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8,
                "learning_rate": ppo_learning_rate},
        "evaluation": {"max_new_tokens": 8, "samples_per_prompt": 4, "promotion_margin": 0.05, **evaluation_cfg},
        "trainer": {"accelerator": "cpu"},
    })


@pytest.fixture(scope="module")
def data():
    return PreparedData(pref_train=random_label_rows(96, 0), pref_eval=random_label_rows(64, 1), rl_prompts=[],
                        eval_prompts=[], counts={}, files={}, sources={"preferences": ["synthetic"]})


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer("tiny:llama")
    texts = [f"Write a one-sentence review of a {a} {n}." for a in ("small", "busy", "quiet", "famous")
             for n in ("cafe", "museum", "park")]
    rows = [{"prompt": t, "prompt_chat": chat_prompt(tok, t)} for t in texts]
    return pipeline.Prompts(rl=rows[:6], eval=rows[6:])


def stage_runs(parent_run_id: str) -> dict:
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def test_random_label_reward_model_stops_the_run_before_rl(mlflow_tracking, data, tmp_path):
    c = cfg(min_eval_accuracy=0.65)
    parent = pipeline.start(c, flow_name="GateTest", run_id="1")
    with pytest.raises(gates.GateError, match=r"held-out accuracy 0\.\d+ ± 0\.\d+ < reward_model.min_eval_accuracy 0\.650"):
        pipeline.train_reward_model(c, parent, data, str(tmp_path))
    run = stage_runs(parent)["train_reward_model"]
    assert run.info.status == "FAILED"
    assert run.data.tags["gate.reward_model"] == "failed"
    assert run.data.metrics["reward_model/eval_accuracy"] < 0.65
    assert MlflowClient().get_run(parent).info.status == "FAILED"


def test_broken_reward_model_policy_is_not_promoted(mlflow_tracking, data, prompts, tmp_path):
    """Gate off: PPO runs against the random reward model, at a learning rate too small to move the policy,
    so the gold judge sees no gain over the reference and the version stays `candidate`; the decision is
    on the evaluate run and the version. (At a rate that moves it, the tiny policy drifts in a random
    direction whose gold win rate on 24 samples is anyone's guess: 0.56 +- 0.05 in one run.)"""
    c = cfg(min_eval_accuracy=0.0, ppo_learning_rate=1e-9)
    parent = pipeline.start(c, flow_name="GateTest", run_id="2")
    rm = pipeline.train_reward_model(c, parent, data, str(tmp_path / "rm"))
    assert rm.metrics["reward_model/eval_accuracy"] < 0.65  # chance level: what the gate above stops
    policy = pipeline.reinforce(c, parent, prompts, rm, str(tmp_path / "ppo"))
    ev = pipeline.evaluate(c, parent, prompts, rm, policy, str(tmp_path / "eval"))
    assert ev.promote is False and "stays candidate" in ev.reason
    assert ev.metrics["eval/gold_win_rate"] == 0.5  # the same answers as the reference: every pair ties
    assert ev.champion.startswith("no rlhf-policy@champion")

    run = stage_runs(parent)["evaluate"]
    assert run.data.tags["gate.promote"] == "False" and run.data.tags["gate.reason"] == ev.reason
    assert run.data.metrics["gate/promote"] == 0.0 and run.data.metrics["gate/threshold"] == 0.55
    artifacts = [f.path for f in MlflowClient().list_artifacts(stage_runs(parent)["reinforce"].info.run_id, "ppo")]
    assert "ppo/overoptimisation.png" in artifacts

    lineage = pipeline.lineage_tags(parent, data, rm, policy, ev, metaflow={"run_id": "2"})
    info = pipeline.register(c, parent, policy, str(tmp_path / "register"), lineage)
    assert info.aliases == ["candidate"]
    tags = MlflowClient().get_model_version(info.name, info.version).tags
    assert tags["gate.promote"] == "False" and tags["gate.reason"] == ev.reason
    # Lineage: the stage runs that made it, the data it was trained on, the figures it was judged by.
    runs = stage_runs(parent)
    assert tags["lineage.reward_model_run_id"] == runs["train_reward_model"].info.run_id
    assert tags["lineage.ppo_run_id"] == runs["reinforce"].info.run_id
    assert tags["lineage.evaluate_run_id"] == runs["evaluate"].info.run_id
    assert tags["lineage.mlflow_parent_run_id"] == parent and tags["lineage.metaflow.run_id"] == "2"
    assert tags["lineage.data.pref_train_sha256"] == data.digests()["pref_train"] != tags["lineage.data.pref_eval_sha256"]
    assert float(tags["eval.gold_win_rate"]) == pytest.approx(ev.metrics["eval/gold_win_rate"], abs=1e-4)
    assert tags["lineage.data.sources"] == '{"preferences": ["synthetic"]}'


def test_policy_must_beat_the_current_champion(mlflow_tracking, data, prompts, tmp_path):
    """With a champion registered, the same policy is compared with it on the same prompts and seeds:
    identical samples, win rate 0.5, not promoted however well it does against the reference."""
    c = cfg(min_eval_accuracy=0.0, promotion_margin=0.0)
    parent = pipeline.start(c, flow_name="GateTest", run_id="3")
    rm = pipeline.train_reward_model(c, parent, data, str(tmp_path / "rm"))
    policy = pipeline.reinforce(c, parent, prompts, rm, str(tmp_path / "ppo"))
    # Make this very policy the champion, as an earlier promoted run would have.
    champion = pipeline.register(c, parent, policy, str(tmp_path / "r0"), lineage={})
    registry.promote(champion.name, champion.version, "an earlier run")
    ev = pipeline.evaluate(c, parent, prompts, rm, policy, str(tmp_path / "eval"))
    assert ev.champion == f"compared with rlhf-policy@champion (v{champion.version})"
    assert ev.metrics["eval/champion_gold_win_rate"] == 0.5
    assert ev.promote is False and f"vs champion v{champion.version} 0.500" in ev.reason
