"""The whole flow on tiny models, through Metaflow's real runtime, MLflow with its sqlite DB and a real
`mlflow models serve` process. One run, many assertions: it is the expensive test of the suite."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlhf_lightning.serving import stop_pid

REPO = Path(__file__).resolve().parents[1]
STAGES = {"preprocess", "validate", "train_reward_model", "prepare_prompts", "reinforce", "evaluate",
          "register", "deploy", "inference"}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from metaflow import Runner

    work = tmp_path_factory.mktemp("flow")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        # Metaflow rejects root; USERNAME is read at call time (METAFLOW_USER only at import).
        "USERNAME": "tester",
        # The Client API in this process must find the run's local datastore (not ./.metaflow).
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        with Runner(str(REPO / "flows" / "rlhf.py"), cwd=str(work), env=env, show_output=True,
                    config=[("cfg", str(REPO / "configs" / "tiny.yaml"))]) as runner:
            # keep_serving: the test itself talks to the endpoint after the flow, then stops it.
            run = runner.run(max_workers=2, keep_serving=True).run
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        # The server the inference step started and left up (keep_serving), on this machine.
        endpoint = run["inference"].task.data.inference_report["endpoint"] if run.successful else None
        yield run, work, endpoint
        if endpoint:
            stop_pid(endpoint["pid"])
        mlflow.set_tracking_uri(None)


def test_flow_succeeds_and_stores_artifacts(flow_run):
    run, work, _ = flow_run
    assert run.successful, "flow failed; see the output above"
    data = run["preprocess"].task.data.data
    assert len(data.pref_train) > 0 and len(data.pref_eval) > 0
    assert len(data.rl_prompts) > 0 and len(data.eval_prompts) > 0
    assert run["validate"].task.data.validation["ok"] is True
    rm = run["train_reward_model"].task.data.reward_model
    assert 0.0 <= rm.metrics["reward_model/eval_accuracy"] <= 1.0
    assert len(rm.tar) > 0
    policy = run["reinforce"].task.data.policy
    assert len(policy.extras["history"]) == 2  # tiny.yaml: 2 PPO iterations
    ev = run["evaluate"].task.data.evaluation
    for name in ("eval/gold_win_rate", "eval/rm_win_rate", "eval/kl", "eval/gold_score", "eval/ref_gold_score"):
        assert name in ev["metrics"]
    report = run["inference"].task.data.inference_report
    assert report["ok"]
    assert [(c["name"], c["ok"]) for c in report["checks"][:2]] == [("alias.candidate", True),
                                                                    ("deployment.model_uri", True)]
    deployed = run["deploy"].task.data.endpoint
    assert deployed == {"target": "rlhf-local", "name": "rlhf-policy-candidate", "alias": "candidate",
                        "model_uri": f"models:/rlhf-policy/{deployed['version']}",
                        "version": run["register"].task.data.model_version.version}
    assert all(a["response"].strip() for a in report["answers"])


def test_mlflow_records(flow_run):
    run, _, _ = flow_run
    client = MlflowClient()
    exp = client.get_experiment_by_name("rlhf-lightning")
    parents = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run.id}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ppo.iterations"] == "2"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert set(by_stage) == STAGES
    # Per-iteration PPO metrics, logged by Lightning into the reinforce run.
    for key in ("ppo/reward", "ppo/kl", "ppo/value_loss", "ppo/clip_fraction", "ppo/response_length"):
        history = client.get_metric_history(by_stage["reinforce"].info.run_id, key)
        assert len(history) == 2, key
    assert "reward_model/eval_accuracy" in by_stage["train_reward_model"].data.metrics
    for key in ("eval/gold_win_rate", "eval/rm_win_rate", "eval/kl", "eval/gold_score", "eval/ref_gold_score",
                "reward_model/eval_accuracy"):
        assert key in by_stage["evaluate"].data.metrics, key
    # Datasets through mlflow.data, the validation report as an artifact.
    names = {d.dataset.name for d in by_stage["preprocess"].inputs.dataset_inputs}
    assert {"pref_train", "pref_eval", "rl_prompts", "eval_prompts"} <= names
    files = [f.path for f in client.list_artifacts(by_stage["validate"].info.run_id, "validation")]
    assert "validation/validation_report.json" in files


def test_registered_version_aliases_follow_the_gate_and_the_checks(flow_run):
    """Registered as `candidate` only; `champion` moved by the inference step after the served candidate
    passed its checks, and only if the evaluation gate promoted it."""
    run, _, _ = flow_run
    client = MlflowClient()
    info = run["register"].task.data.model_version
    assert info.aliases == ["candidate"]
    mv = client.get_model_version("rlhf-policy", info.version)
    assert "candidate" in mv.aliases
    promoted = run["evaluate"].task.data.evaluation["promote"]
    assert ("champion" in mv.aliases) == promoted
    assert ("champion" in run["end"].task.data.model_version.aliases) == promoted
    assert ("champion.promoted_at" in mv.tags) == promoted
    inference_run = _stage_runs(client, run)["inference"]
    assert inference_run.data.tags["champion.decision"].startswith("promoted" if promoted else "champion not moved")


def test_registered_version_carries_its_lineage(flow_run):
    run, _, _ = flow_run
    client = MlflowClient()
    info = run["register"].task.data.model_version
    tags = client.get_model_version("rlhf-policy", info.version).tags
    stages = _stage_runs(client, run)
    assert tags["lineage.metaflow.flow_name"] == "RLHFFlow" and tags["lineage.metaflow.run_id"] == str(run.id)
    assert tags["lineage.mlflow_parent_run_id"] == stages["register"].data.tags["mlflow.parentRunId"]
    assert tags["lineage.reward_model_run_id"] == stages["train_reward_model"].info.run_id
    assert tags["lineage.ppo_run_id"] == stages["reinforce"].info.run_id
    assert tags["lineage.evaluate_run_id"] == stages["evaluate"].info.run_id
    digests = run["preprocess"].task.data.data.digests()
    for split, digest in digests.items():
        assert tags[f"lineage.data.{split}_sha256"] == digest
    assert tags["base_model"] == "tiny:llama" and tags["weights_sha256"] == info.weights_sha256
    ev = run["evaluate"].task.data.evaluation
    assert tags["gate.promote"] == str(ev["promote"]) and tags["gate.reason"] == ev["reason"]
    assert float(tags["eval.gold_win_rate"]) == pytest.approx(ev["metrics"]["eval/gold_win_rate"], abs=1e-4)
    description = client.get_model_version("rlhf-policy", info.version).description
    assert f"| lineage.metaflow.run_id | {run.id} |" in description


def _stage_runs(client, run) -> dict:
    exp = client.get_experiment_by_name("rlhf-lightning")
    parent = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run.id}'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {c.data.tags["stage"]: c for c in children}


def test_served_model_answers(flow_run):
    run, _, endpoint = flow_run
    body = json.dumps({"dataframe_records": [{"prompt": "Write a one-sentence review of a quiet park."}],
                       "params": {"max_new_tokens": 5, "temperature": 0.0}}).encode()
    req = urllib.request.Request(endpoint["url"] + "/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        answer = json.loads(resp.read())["predictions"][0]
    assert isinstance(answer["response"], str)
    assert 1 <= answer["completion_tokens"] <= 5
    assert answer["weights_sha256"] == run["register"].task.data.model_version.weights_sha256


def test_expected_failures_stop_the_run_with_their_message_and_no_traceback(tmp_path):
    """Bad data (here: preference and prompt files that do not exist) stops the flow at `validate`, with
    the step's name and the library's message, and no Python traceback (which is for bugs)."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text()),
                                   "data": {"preferences": ["missing-*.jsonl"], "prompts": ["prompts.jsonl"]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "USERNAME": "tester"}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", str(cfg), "run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rlhf-lightning stopped the run" in out and "validate: data validation failed" in out, out[-3000:]
    assert "no file matches this pattern (fix the glob in data.preferences" in out
    assert "Traceback" not in out
