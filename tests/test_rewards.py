"""Rewards users bring: a reward model already trained (published shapes, or one this project registered),
reward functions weighted beside it, and the trained reward model as a registered, servable model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from families import deberta_v2_reward_dir, llama3_reward_dir
from rlhf_lightning import pipeline
from rlhf_lightning.config import ConfigError, RewardConfig, from_dict
from rlhf_lightning.data.preprocess import PreparedData
from rlhf_lightning.models.generation import chat_prompt
from rlhf_lightning.models.loading import load_tokenizer
from rlhf_lightning.models.reward_model import PUBLISHED_FILE, RewardScorer, measure_published
from rlhf_lightning.models.rewards import RewardFunctionError, Rewards
from test_reward_model import preference_rows  # noqa: E402 (tests dir is on sys.path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARITHMETIC = "rlhf_lightning.data.arithmetic"


# Reward functions that misbehave, named by `test_rewards:<name>` (this module is importable: tests/ is on
# sys.path, as a user's module beside the flow is in a step).
def raises_on_seven(prompts, responses, **columns):
    for response in responses:
        if "7" in response:
            raise ValueError("seven is not a number I take")
    return [0.0] * len(responses)


def one_value(prompts, responses, **columns):
    return [1.0]


def nan_on_second(prompts, responses, **columns):
    return [0.0 if i != 1 else float("nan") for i in range(len(responses))]


def words(prompts, responses, **columns):
    return ["high"] * len(responses)


def answer_only(prompts, responses, answer):  # no **kwargs: gets `answer` and nothing else
    return [float(r.strip() == a) for r, a in zip(responses, answer)]


def prompt_rows(n: int, with_chat: bool = True) -> list[dict]:
    from rlhf_lightning.data.arithmetic import generate

    tok = load_tokenizer("tiny:llama")
    return [{"prompt": r["prompt"], **({"prompt_chat": chat_prompt(tok, r["prompt"])} if with_chat else {}),
             "extra": {"answer": r["answer"]}, "source": f"sums.jsonl:{i + 1}"} for i, r in enumerate(generate(n, 0))]


def test_reward_config_says_what_is_wrong():
    cfg = from_dict({"reward": {"model_weight": 0.5, "functions": [f"{ARITHMETIC}:exact_match",
                                                                   {"function": f"{ARITHMETIC}:number_only",
                                                                    "weight": 0.2, "name": "format"}]}})
    assert [(f.term, f.weight) for f in cfg.reward.functions] == [("exact_match", 1.0), ("format", 0.2)]
    assert cfg.trains_reward_model and from_dict({"reward_model": {"pretrained": "org/rm"}}).trains_reward_model is False
    for tree, message in (
        ({"reward": {"model_weight": None}}, "nothing to maximise"),
        ({"reward": {"model_weight": 0.0}}, "nothing to maximise"),
        ({"reward": {"functions": ["no_colon"]}}, "write `module.path:function_name`"),
        ({"reward": {"functions": [f"{ARITHMETIC}:exact_match", f"{ARITHMETIC}:exact_match"]}}, "used twice"),
        ({"reward": {"model_weight": None, "functions": [f"{ARITHMETIC}:exact_match"]},
          "reward_model": {"pretrained": "org/rm"}}, "remove one of them"),
        ({"reward_model": {"input": "xml"}}, r"use one of \['auto', 'chat', 'pair'\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(tree)
    # Prompts of one's own and no preference pairs: the built-in task is generated only where a reward
    # model is trained here (its preference pairs are what it trains on).
    own = {"data": {"prompts": ["p.jsonl"]}}
    assert from_dict(own).uses_builtin_task
    assert not from_dict({**own, "reward": {"model_weight": None, "functions": [f"{ARITHMETIC}:exact_match"]}}).uses_builtin_task
    assert not from_dict({**own, "reward_model": {"pretrained": "org/rm"}}).uses_builtin_task


def test_the_reward_is_the_weighted_sum_of_its_terms(reward_model_dir):
    cfg = RewardConfig(model_weight=0.5, functions=from_dict({"reward": {"functions": [
        {"function": f"{ARITHMETIC}:exact_match", "weight": 2.0},
        {"function": f"{ARITHMETIC}:number_only", "weight": -1.0}]}}).reward.functions)
    rewards = Rewards.load(cfg, reward_model_dir)
    rewards.scorer.mean, rewards.scorer.std = 0.25, 2.0
    rows = prompt_rows(3, with_chat=False)
    answers = [r["extra"]["answer"] for r in rows]
    responses = [answers[0], f"It is {answers[1]}.", str(int(answers[2]) + 1)]
    terms = rewards.score([r["prompt"] for r in rows], responses, rows)
    assert list(terms) == ["model", "exact_match", "number_only"] == rewards.terms
    assert terms["exact_match"].tolist() == [1.0, 1.0, 0.0] and terms["number_only"].tolist() == [1.0, 0.0, 1.0]
    model = RewardScorer.load(reward_model_dir).score([r["prompt"] for r in rows], responses)
    torch.testing.assert_close(terms["model"], model)
    expected = 0.5 * (model - 0.25) / 2.0 + 2.0 * terms["exact_match"] - terms["number_only"]
    torch.testing.assert_close(rewards.total(terms), expected)


@pytest.mark.parametrize("name, message", [
    ("raises_on_seven", r"reward function raises_on_seven \(test_rewards:raises_on_seven\): raised ValueError: seven "
                        r"is not a number I take at .*test_rewards.py:\d+, on row 1 \(sums.jsonl:2, prompt 'What is"),
    ("one_value", r"returned 1 values for 3 responses; return one per response"),
    ("nan_on_second", r"returned nan for row 1 \(sums.jsonl:2, prompt 'What is .*'\) \(and 0 more\); every value must"),
    ("words", r"returned list .*; return one float per response"),
])
def test_a_reward_function_that_fails_stops_with_its_name_and_the_row(name, message):
    rewards = Rewards.load(RewardConfig(model_weight=None, functions=from_dict(
        {"reward": {"functions": [f"test_rewards:{name}"]}}).reward.functions), None)
    rows = prompt_rows(3, with_chat=False)
    with pytest.raises(RewardFunctionError, match=message):
        rewards.score([r["prompt"] for r in rows], ["6", "7", "8"], rows)


def test_a_function_gets_the_columns_it_declares_and_travels_by_its_name():
    """A prompt file's other columns (`id`) do not reach a function that does not declare them; a function
    goes to ddp_spawn's processes as its module:function, reloaded there."""
    import pickle

    from rlhf_lightning.models.rewards import RewardFunction, column_problems

    (fn,) = [RewardFunction.load(f) for f in from_dict({"reward": {"functions": ["test_rewards:answer_only"]}}).reward.functions]
    rows = [{"prompt": "What is 1 + 1?", "extra": {"answer": "2", "id": 7}, "source": "f:1"},
            {"prompt": "What is 2 + 2?", "extra": {"answer": "4", "id": 8}, "source": "f:2"}]
    assert fn(["p", "q"], ["2", "5"], rows).tolist() == [1.0, 0.0]
    again = pickle.loads(pickle.dumps(fn))
    assert (again.name, again.weight, again.spec, again.fn) == (fn.name, fn.weight, fn.spec, answer_only)
    (problem,) = column_problems([fn], rows + [{"prompt": "What is 3 + 3?", "extra": {}, "source": "f:3"}], "prompts")
    assert "needs column 'answer', which 1 of 3 prompts lack, first row 2 (f:3" in problem


def test_an_unimportable_reward_function_stops_validation():
    from rlhf_lightning.models.rewards import load_function

    with pytest.raises(ConfigError, match="cannot import 'no_such_module'.*importable where the steps run"):
        load_function("no_such_module:f")
    with pytest.raises(ConfigError, match=f"{ARITHMETIC} has no function 'nope'"):
        load_function(f"{ARITHMETIC}:nope")


def test_prompt_files_keep_their_columns_through_preprocess_and_validate(tmp_path):
    from rlhf_lightning.data.preprocess import preprocess
    from rlhf_lightning.data.validate import validate

    (tmp_path / "rl.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1),
                                                           "meta": {"level": i % 3}}) + "\n" for i in range(8)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "What is 40 + 2?", "answer": "42"}) + "\n"
                                         + json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    cfg = from_dict({"policy": {"model": "tiny:llama"},
                     "data": {"prompts": [str(tmp_path / "rl.jsonl")], "eval_prompts": [str(tmp_path / "eval.jsonl")]},
                     "reward": {"model_weight": None, "functions": [f"{ARITHMETIC}:exact_match"]}})
    data = preprocess(cfg, str(tmp_path / "out"))
    assert data.pref_train == [] and data.sources["preferences"] == []  # no built-in task generated
    assert data.rl_prompts[3]["extra"] == {"answer": "4", "meta": {"level": 0}}
    assert data.eval_prompts[1]["extra"] == {}
    stored = pd.read_parquet(data.files["rl_prompts"])
    assert json.loads(stored["extra"][3]) == {"answer": "4", "meta": {"level": 0}}
    report = validate(data, cfg)
    (error,) = report.errors
    assert error.kind == "missing_column" and "needs column 'answer', which 1 of 2 eval_prompts lack" in error.message
    assert f"{tmp_path / 'eval.jsonl'}:2" in error.message
    assert not [e for e in report.errors if e.kind == "empty_split"]  # no preference split is needed


@pytest.mark.parametrize("family", ["deberta_v2", "llama3"])
def test_a_published_reward_model_is_used_as_published(family, tmp_path):
    """DeBERTa-v3's shape (no template: the tokenizer's own [CLS] p [SEP] r [SEP]) and a Llama-3-based one
    (its chat template, no pad token, bf16 weights): each row scores as the published model scores it
    alone, also beside longer rows; the step ships a reference, not the weights; the normalisation is
    its scores' mean and std on the policy's samples for the RL prompts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = deberta_v2_reward_dir(tmp_path / "rm") if family == "deberta_v2" else llama3_reward_dir(tmp_path / "rm")
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "ppo": {"max_new_tokens": 6},
                     "reward_model": {"pretrained": path, "max_length": 96, "normalisation_prompts": 6},
                     "trainer": {"accelerator": "cpu"}})
    pairs = preference_rows(8, 1)
    result, samples = measure_published(cfg, pairs, prompt_rows(8), str(tmp_path / "out"))
    assert [p.name for p in Path(result.model_dir).iterdir()] == [PUBLISHED_FILE]
    published = json.loads((Path(result.model_dir) / PUBLISHED_FILE).read_text())
    assert published["input"] == ("pair" if family == "deberta_v2" else "chat")
    assert {"eval_accuracy", "eval_accuracy_ci95", "normalisation_mean", "normalisation_std"} <= set(result.metrics)

    scorer = RewardScorer.load(result.model_dir)
    assert scorer.model.dtype == (torch.float32 if family == "deberta_v2" else torch.bfloat16)
    scores = torch.tensor([s["score"] for s in samples])
    assert len(samples) == 6 and published["mean"] == pytest.approx(scores.mean().item(), abs=1e-3)
    assert published["std"] == pytest.approx(scores.std().item(), abs=1e-3)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto").eval()

    def alone(prompt: str, response: str) -> torch.Tensor:
        if family == "deberta_v2":
            enc = tok(prompt, response, return_tensors="pt")
        else:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                          return_tensors="pt", return_dict=True)
            assert tok.pad_token_id is None and enc["input_ids"][0, 0] == tok.bos_token_id
        with torch.no_grad():
            return model(**enc).logits[0, 0].float()

    prompts = ["Review a cafe.", "Write a one-sentence review of a small quiet park in the old town near the river."]
    responses = ["Nice.", "It was lovely and green, with friendly people and clean paths everywhere."]
    expected = torch.stack([alone(p, r) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scorer.score(prompts, responses), expected, atol=2e-2, rtol=2e-2)

    none = measure_published(cfg, [], prompt_rows(8), str(tmp_path / "out2"))[0]  # no preference data
    assert "eval_accuracy" not in none.metrics and none.reward_mean == pytest.approx(result.reward_mean)


def test_a_model_that_is_not_a_reward_model_is_refused(tmp_path):
    """A causal LM named as the reward model would load with a random scoring head: refused, saying so."""
    from families import build_family

    cfg = from_dict({"policy": {"model": "tiny:llama"}, "ppo": {"max_new_tokens": 4},
                     "reward_model": {"pretrained": build_family("llama3", tmp_path / "lm"), "normalisation_prompts": 2},
                     "trainer": {"accelerator": "cpu"}})
    with pytest.raises(ConfigError, match="has no trained weights for score.weight: it is not a reward model"):
        measure_published(cfg, [], prompt_rows(2), str(tmp_path))


def test_ppo_and_the_evaluation_maximise_and_report_every_term(tmp_path):
    """Reward functions alone (no reward model): PPO's per-iteration reward is the weighted sum of the
    terms it logs, and the evaluation reports each term and decides by the total's win rate."""
    from rlhf_lightning.evaluation import compare
    from rlhf_lightning.models.ppo import train_ppo

    cfg = from_dict({
        "policy": {"model": "tiny:llama", "lora": {"r": 4, "alpha": 8}},
        "data": {"prompts": ["sums.jsonl"]},  # the user's own prompts: no gold judge
        "reward": {"model_weight": None, "functions": [f"{ARITHMETIC}:exact_match",
                                                       {"function": f"{ARITHMETIC}:number_only", "weight": 0.2}]},
        "ppo": {"iterations": 2, "rollout_batch_size": 4, "samples_per_prompt": 2, "minibatch_size": 8,
                "ppo_epochs": 1, "max_new_tokens": 6, "estimator": "rloo"},
        "evaluation": {"max_new_tokens": 6, "samples_per_prompt": 1},
        "trainer": {"accelerator": "cpu"},
    })
    rows = prompt_rows(12)
    result = train_ppo(cfg, rows[:8], None, str(tmp_path / "ppo"))
    for h in result.history:
        assert h["ppo/reward"] == pytest.approx(h["ppo/reward/exact_match"] + 0.2 * h["ppo/reward/number_only"])
        assert "ppo/reward/model" not in h
    ev = compare.evaluate(cfg, rows[8:], result.adapter_dir, None)
    m = ev.metrics
    assert m["eval/reward"] == pytest.approx(m["eval/reward/exact_match"] + 0.2 * m["eval/reward/number_only"])
    assert "eval/reward_win_rate" in m and "eval/rm_win_rate" not in m and ev.reason.startswith("reward win rate")
    assert {"policy_reward", "policy_reward/exact_match", "reference_reward"} <= set(ev.samples[0])


def test_a_trained_reward_model_is_registered_served_and_reused_by_uri(mlflow_tracking, tmp_path):
    """The reward model a run trains becomes `rlhf-reward` v1 (lineage of its data, held-out figures); its
    pyfunc and a real `mlflow models serve` score rows as training measured them; a later run names it
    by URI, skips training, and measures it on the same pairs to the same accuracy."""
    from rlhf_lightning.serving.server import ModelServer, invoke, predict_records

    base = {"policy": {"model": "tiny:llama"}, "ppo": {"max_new_tokens": 6}, "trainer": {"accelerator": "cpu"}}
    cfg = from_dict({**base, "reward_model": {"backbone": "tiny:bert", "max_length": 48, "learning_rate": 3e-3,
                                              "batch_size": 8, "epochs": 2, "min_eval_accuracy": 0.0}})
    data = PreparedData(pref_train=preference_rows(48, 0), pref_eval=preference_rows(24, 1), rl_prompts=prompt_rows(6),
                        eval_prompts=[], counts={}, files={}, sources={"preferences": ["synthetic.jsonl"]})
    parent = pipeline.start(cfg, flow_name="RewardTest", run_id="1")
    trained = pipeline.train_reward_model(cfg, parent, data, str(tmp_path / "rm"))

    client = MlflowClient()
    version = client.get_model_version("rlhf-reward", "1")
    assert version.aliases == ["candidate"] and version.run_id == trained.mlflow_run_id
    assert version.tags["lineage.data.pref_train_sha256"] == data.digests()["pref_train"]
    assert version.tags["lineage.data.sources"] == '["synthetic.jsonl"]'
    assert float(version.tags["eval.eval_accuracy"]) == pytest.approx(trained.metrics["reward_model/eval_accuracy"], abs=1e-4)
    assert client.get_run(trained.mlflow_run_id).data.tags["reward_model.registered"] == "models:/rlhf-reward/1"

    rows = [{"prompt": r["prompt"], "response": r[side]} for r in data.pref_eval[:6] for side in ("chosen", "rejected")]
    scorer = RewardScorer.load(trained.extract(str(tmp_path / "trained")))
    expected = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    served = mlflow.pyfunc.load_model("models:/rlhf-reward/1").predict(pd.DataFrame(rows))
    torch.testing.assert_close(torch.tensor(served["score"].to_numpy(), dtype=torch.float32), expected, atol=1e-4, rtol=1e-4)
    assert served["score_normalised"].tolist() == pytest.approx(((expected - scorer.mean) / scorer.std).tolist(), abs=1e-4)
    with ModelServer("models:/rlhf-reward/1") as server:
        answer = predict_records(server.url, rows[:2])
        assert [p["score"] for p in answer] == pytest.approx(expected[:2].tolist(), abs=1e-4)
        bad = invoke(server.url, {"dataframe_records": [{"prompt": "only a prompt"}]})
        assert bad.status == 400 and "missing inputs ['response']" in bad.error_message  # the signature's check

    reuse = from_dict({**base, "reward_model": {"pretrained": "models:/rlhf-reward@candidate", "max_length": 48,
                                                "normalisation_prompts": 4, "min_eval_accuracy": 0.0}})
    parent = pipeline.start(reuse, flow_name="RewardTest", run_id="2")
    again = pipeline.train_reward_model(reuse, parent, data, str(tmp_path / "reuse"))
    assert again.metrics["reward_model/eval_accuracy"] == trained.metrics["reward_model/eval_accuracy"]
    assert again.metrics["reward_model/normalisation_samples"] == 4.0
    assert [str(v.version) for v in client.search_model_versions("name = 'rlhf-reward'")] == ["1"]  # nothing new
    # The alias is pinned to the version it named when measured: every step scores with that model (and the
    # policy's lineage names it so).
    assert again.published_as() == "models:/rlhf-reward/1" and trained.published_as() == "trained"
    assert json.loads((Path(again.extract(str(tmp_path / "again"))) / PUBLISHED_FILE).read_text())["model"] == \
        "models:/rlhf-reward/1"
    reloaded = RewardScorer.load(again.extract(str(tmp_path / "again")))
    assert reloaded.input == "trained"
    torch.testing.assert_close(reloaded.score([r["prompt"] for r in rows], [r["response"] for r in rows]), expected)
    assert client.get_run(again.mlflow_run_id).data.tags["gate.reward_model"] == "passed"

    # With no preference data there is nothing to measure it on: the gate is skipped, and says so.
    prompts_only = PreparedData(pref_train=[], pref_eval=[], rl_prompts=prompt_rows(6), eval_prompts=[], counts={},
                                files={}, sources={})
    parent = pipeline.start(reuse, flow_name="RewardTest", run_id="3")
    bare = pipeline.train_reward_model(reuse, parent, prompts_only, str(tmp_path / "bare"))
    assert "reward_model/eval_accuracy" not in bare.metrics and "reward_model/normalisation_std" in bare.metrics
    assert client.get_run(bare.mlflow_run_id).data.tags["gate.reward_model"] == "skipped: no preference data"
