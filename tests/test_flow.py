"""The whole flow on tiny models, through Metaflow's real runtime, MLflow with its sqlite DB and a real
`mlflow models serve` process. One run, many assertions: it is the expensive test of the suite.

The run is killed twice on its way, as machines die in the cloud: the PPO task gets a SIGKILL after its
first checkpoint (`@retry` runs it again, from that checkpoint), then the whole run gets a SIGKILL during
the retry (`resume` finishes it, from the retry's last checkpoint). Everything a clean run gives must
still be there and true: artifacts, MLflow records, lineage, a served model, and a PPO that ends where an
uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from rlhf_lightning.serving.server import stop_pid

REPO = Path(__file__).resolve().parents[1]
STAGES = {"preprocess", "validate", "train_reward_model", "prepare_prompts", "reinforce", "evaluate",
          "register", "deploy", "inference"}
ITERATIONS = 16  # configs/tiny.yaml checkpoints PPO every 2 iterations


def _wait(what: str, check, proc: subprocess.Popen, timeout: float = 400.0, every: float = 0.05):
    """Poll `check()` until it returns something truthy; fail if the flow process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the flow ended (rc {proc.returncode}) before {what}")
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def _checkpoints(work: Path, run_id: str) -> list[int]:
    """Iterations of the PPO checkpoints of Metaflow run `run_id`, in the local datastore."""
    found = work.glob(f"**/rlhf_lightning/checkpoints/RLHFFlow/{run_id}/reinforce/batch-*.ckpt")
    return sorted(int(p.name[6:14]) for p in found)


def _task(root: int, step: str, attempt: int) -> psutil.Process | None:
    """The process running attempt `attempt` of `step` under the flow process `root`."""
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "step" in cmd and step in cmd and f"--retry-count={attempt}" in " ".join(cmd).replace("--retry-count ", "--retry-count="):
            return proc
    return None


def flow_config(work: Path) -> Path:
    """configs/tiny.yaml with a policy in Gemma 2's shape (tests/families.py), built in `work`: the whole
    flow on a non-Llama family, whose template refuses system messages and whose turns end with
    <end_of_turn>, not the tokenizer's eos."""
    import yaml

    from families import build_family

    path = work / "run.yaml"
    if not path.exists():
        model = build_family("gemma2", work / "gemma2")
        # A reward function beside the reward model: its term goes through the kills and the resume too.
        path.write_text(yaml.safe_dump({"include": "configs/tiny.yaml", "policy": {"model": model},
                                        "data": {"prompt_length": 64},
                                        "reward": {"functions": [{"function": "rlhf_lightning.data.arithmetic:number_only",
                                                                  "weight": 0.1}]}}))
    return path


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from metaflow import Run, get_metadata, metadata, namespace

    work = tmp_path_factory.mktemp("flow")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        # Metaflow rejects root; USERNAME is read at call time (METAFLOW_USER only at import).
        "USERNAME": "tester",
        # The Client API in this process must find the run's local datastore (not ./.metaflow).
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("MLFLOW_RUN_ID", None)
    flow = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", str(flow_config(work))]
    log = open(work / "flow.log", "w")
    # keep_serving: the test itself talks to the endpoint after the flow, then stops it.
    first = subprocess.Popen([*flow, "run", "--max-workers", "2", "--ppo_iterations", str(ITERATIONS),
                              "--keep_serving", "true", "--run-id-file", str(work / "run_id")],
                             cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    faults = {}
    try:
        run_id = _wait("the run id", lambda: (work / "run_id").exists() and (work / "run_id").read_text().strip(), first)
        # 1. The PPO task dies after its first checkpoint; @retry starts attempt 1.
        _wait("PPO's first checkpoint", lambda: _checkpoints(work, run_id), first)
        task = _task(first.pid, "reinforce", 0)
        assert task is not None, "no reinforce task process found"
        task.send_signal(signal.SIGKILL)
        faults["task_killed_after"] = _checkpoints(work, run_id)[-1]
        # 2. The whole run dies (runtime and tasks) during attempt 1, after it wrote a new checkpoint.
        _wait("the retry's first new checkpoint",
              lambda: _task(first.pid, "reinforce", 1) and _checkpoints(work, run_id)[-1] > faults["task_killed_after"], first)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
        faults["run_killed_after"] = _checkpoints(work, run_id)[-1]
        # 3. `resume` finishes the run.
        # (A resume takes the origin run's config: Metaflow refuses --config with `resume`.)
        resume = subprocess.run([*flow[:2], "resume", "--origin-run-id", run_id, "--run-id-file", str(work / "resumed_id")],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    output = (work / "flow.log").read_text()
    print(output[-20000:])
    assert resume.returncode == 0, "resume failed; see the output above"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "USERNAME", "METAFLOW_DATASTORE_SYSROOT_LOCAL"):
            mp.setenv(key, env[key])
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        previous = get_metadata()
        metadata(f"local@{work}")  # the runs' local metadata and datastore
        namespace(None)
        run = Run(f"RLHFFlow/{(work / 'resumed_id').read_text().strip()}")
        # The server the inference step started and left up (keep_serving), on this machine.
        endpoint = run["inference"].task.data.served.endpoint if run.successful else None
        yield run, work, endpoint, {"origin_run_id": run_id, "output": output, **faults}
        if endpoint:
            stop_pid(endpoint["pid"])
        mlflow.set_tracking_uri(None)
        if "@<" not in previous:  # "local@<No .metaflow directory found ...>": nothing to restore
            metadata(previous)


def test_flow_succeeds_and_stores_artifacts(flow_run):
    run, work, _, _ = flow_run
    assert run.successful, "flow failed; see the output above"
    data = run["preprocess"].task.data.data
    assert len(data.pref_train) > 0 and len(data.pref_eval) > 0
    assert len(data.rl_prompts) > 0 and len(data.eval_prompts) > 0
    assert run["validate"].task.data.validation["ok"] is True
    rm = run["train_reward_model"].task.data.reward_model
    assert 0.0 <= rm.metrics["reward_model/eval_accuracy"] <= 1.0
    assert len(rm.tar) > 0
    policy = run["reinforce"].task.data.policy
    assert [h["iteration"] for h in policy.history] == list(range(ITERATIONS))
    ev = run["evaluate"].task.data.evaluation
    for name in ("eval/gold_win_rate", "eval/rm_win_rate", "eval/kl", "eval/gold_score", "eval/ref_gold_score"):
        assert name in ev.metrics
    report = run["inference"].task.data.served.report
    assert report["ok"]
    assert [(c["name"], c["ok"]) for c in report["checks"][:2]] == [("alias.candidate", True),
                                                                    ("deployment.model_uri", True)]
    deployed = vars(run["deploy"].task.data.endpoint)
    assert deployed == {"target": "rlhf-local", "name": "rlhf-policy-candidate", "alias": "candidate",
                        "model_uri": f"models:/rlhf-policy/{deployed['version']}",
                        "version": run["register"].task.data.model_version.version}
    assert all(a["response"].strip() for a in report["answers"])


def test_mlflow_records(flow_run):
    run, _, _, _ = flow_run
    client = MlflowClient()
    exp = client.get_experiment_by_name("rlhf-lightning")
    parents = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run.id}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ppo.iterations"] == str(ITERATIONS)
    by_stage = _stage_runs(client, run)
    assert set(by_stage) == STAGES
    # Per-iteration PPO metrics, logged by Lightning into the reinforce run: every iteration once, those
    # the killed attempts did included (the finished attempt re-logs what its checkpoint holds).
    for key in ("ppo/reward", "ppo/reward/model", "ppo/reward/number_only", "ppo/kl", "ppo/value_loss",
                "ppo/clip_fraction", "ppo/response_length"):
        history = client.get_metric_history(by_stage["reinforce"].info.run_id, key)
        assert sorted(m.step for m in history) == list(range(ITERATIONS)), key
    assert "reward_model/eval_accuracy" in by_stage["train_reward_model"].data.metrics
    for key in ("eval/gold_win_rate", "eval/rm_win_rate", "eval/kl", "eval/gold_score", "eval/ref_gold_score",
                "reward_model/eval_accuracy", "eval/reward", "eval/reward/number_only", "eval/ref_reward/number_only"):
        assert key in by_stage["evaluate"].data.metrics, key
    # The trained reward model is a registered model of its own, from the reward-model stage's run.
    (rm_version,) = client.search_model_versions(
        f"name = 'rlhf-reward' and run_id = '{by_stage['train_reward_model'].info.run_id}'")
    assert rm_version.tags["lineage.mlflow_parent_run_id"] == parent.info.run_id
    # Datasets through mlflow.data, the validation report as an artifact.
    names = {d.dataset.name for d in by_stage["preprocess"].inputs.dataset_inputs}
    assert {"pref_train", "pref_eval", "rl_prompts", "eval_prompts"} <= names
    files = [f.path for f in client.list_artifacts(by_stage["validate"].info.run_id, "validation")]
    assert "validation/validation_report.json" in files
    # The side-by-side answers, as a table the UI shows.
    shown = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=by_stage["evaluate"].info.run_id, artifact_path="evaluation/side_by_side.json")).read_text())
    assert shown["columns"][:4] == ["case", "prompt", "reference", "policy"] and shown["data"]

    # The parent run a person opens first: the headline figures, the version and the decision, linked.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # training runs, not GenAI traces
    ev = run["evaluate"].task.data.evaluation
    for key in ("eval/gold_win_rate", "eval/gold_win_rate_ci95", "eval/rm_win_rate", "eval/kl", "gate/promote",
                "reward_model/eval_accuracy", "reward_model/eval_accuracy_ci95"):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["eval/gold_win_rate"] == pytest.approx(ev.metrics["eval/gold_win_rate"])
    version = run["register"].task.data.model_version.version
    assert parent.data.tags["registered_version"] == version and parent.data.tags["gate.reason"] == ev.reason
    assert f"[v{version}](#/models/rlhf-policy/versions/{version})" in parent.data.tags["mlflow.note.content"]
    # One name per metric: the reward model's curves and final figures share theirs.
    rm_names = set(by_stage["train_reward_model"].data.metrics)
    assert not [k for k in rm_names if k.startswith("rm/")] and "reward_model/train_loss" in rm_names


def test_the_run_says_what_to_open_next_and_prints_the_validation_summary(flow_run):
    run, _, _, faults = flow_run
    out = faults["output"]
    version = run["register"].task.data.model_version.version
    assert "next:" in out and f"read the answers:        python flows/rlhf.py card view {run.id}/evaluate" in out
    assert "see the runs:            mlflow ui --backend-store-uri sqlite:///" in out
    # The link opens the runs: MLflow 3's UI would otherwise open on its GenAI traces page.
    assert "#/experiments/1/runs/" in out and "?workflowType=machine_learning)" in out
    assert f"serve this version:      python -m rlhf_lightning serve --model-uri models:/rlhf-policy" in out
    if "champion" not in run["end"].task.data.model_version.aliases:
        assert f"make it the champion:    python -m rlhf_lightning promote --version {version}" in out
    assert "data ok: 0 error(s)" in out  # the validate step's console summary
    for noise in ("Failed to load CPU gemm_4bit_forward", "💡 Tip:"):
        assert noise not in out, noise


def test_registered_version_aliases_follow_the_gate_and_the_checks(flow_run):
    """Registered as `candidate` only; `champion` moved by the inference step after the served candidate
    passed its checks, and only if the evaluation gate promoted it."""
    run, _, _, _ = flow_run
    client = MlflowClient()
    info = run["register"].task.data.model_version
    assert info.aliases == ["candidate"]
    mv = client.get_model_version("rlhf-policy", info.version)
    assert "candidate" in mv.aliases
    promoted = run["evaluate"].task.data.evaluation.promote
    assert ("champion" in mv.aliases) == promoted
    assert ("champion" in run["end"].task.data.model_version.aliases) == promoted
    assert ("champion.promoted_at" in mv.tags) == promoted
    inference_run = _stage_runs(client, run)["inference"]
    assert inference_run.data.tags["champion.decision"].startswith("promoted" if promoted else "champion not moved")


def test_registered_version_carries_its_lineage(flow_run):
    run, work, _, _ = flow_run
    client = MlflowClient()
    info = run["register"].task.data.model_version
    tags = client.get_model_version("rlhf-policy", info.version).tags
    stages = _stage_runs(client, run)
    assert tags["lineage.metaflow.flow_name"] == "RLHFFlow" and tags["lineage.metaflow.run_id"] == str(run.id)
    assert tags["lineage.mlflow_parent_run_id"] == stages["register"].data.tags["mlflow.parentRunId"]
    assert tags["lineage.reward_model_run_id"] == stages["train_reward_model"].info.run_id
    assert tags["lineage.ppo_run_id"] == stages["reinforce"].info.run_id
    assert tags["lineage.evaluate_run_id"] == stages["evaluate"].info.run_id
    # The reward it maximised: the reward model trained in this run, plus the reward function, weighted.
    assert tags["lineage.reward.model"] == "trained" and tags["lineage.reward.model_weight"] == "1.0"
    assert json.loads(tags["lineage.reward.functions"]) == [{"function": "rlhf_lightning.data.arithmetic:number_only",
                                                             "weight": 0.1}]
    digests = run["preprocess"].task.data.data.digests()
    for split, digest in digests.items():
        assert tags[f"lineage.data.{split}_sha256"] == digest
    assert tags["base_model"] == str(work / "gemma2") and tags["weights_sha256"] == info.weights_sha256
    ev = run["evaluate"].task.data.evaluation
    assert tags["gate.promote"] == str(ev.promote) and tags["gate.reason"] == ev.reason
    assert float(tags["eval.gold_win_rate"]) == pytest.approx(ev.metrics["eval/gold_win_rate"], abs=1e-4)
    description = client.get_model_version("rlhf-policy", info.version).description
    assert f"| lineage.metaflow.run_id | {run.id} |" in description


def _all_stage_runs(client, run) -> list:
    exp = client.get_experiment_by_name("rlhf-lightning")
    parent = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run.id}'")[0]
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def _stage_runs(client, run) -> dict:
    """The finished run of each stage (the killed attempts' runs left out)."""
    return {c.data.tags["stage"]: c for c in _all_stage_runs(client, run) if c.info.status == "FINISHED"}


def test_ppo_continued_from_its_checkpoints_after_each_kill(flow_run, tmp_path):
    """The retry resumed from the killed task's last checkpoint, the resumed run from the retry's last
    one; the final adapter and value head equal an uninterrupted run's with the same seed."""
    from safetensors.torch import load_file

    from rlhf_lightning.config import load_config
    from rlhf_lightning.judge import has_gold_judge
    from rlhf_lightning.models.ppo import train_ppo

    run, work, _, faults = flow_run
    k0, k1 = faults["task_killed_after"], faults["run_killed_after"]
    assert 0 < k0 < k1 < ITERATIONS
    out = faults["output"]
    origin = f"RLHFFlow/{faults['origin_run_id']}/reinforce"
    assert f"{origin}/batch-{k0:08d}.ckpt ({k0} batches done)" in out  # attempt 1, same run
    assert f"{origin}/batch-{k1:08d}.ckpt ({k1} batches done)" in out  # the resumed run
    assert out.count("PPO: resuming from the checkpoint") == 2

    task = run["reinforce"].task
    cfg = load_config(flow_config(work))
    cfg.ppo.iterations = ITERATIONS
    rm_dir = task.data.reward_model.extract(str(tmp_path / "rm"))
    straight = train_ppo(cfg, task.data.prompts.rl, rm_dir, str(tmp_path / "ppo"), gold_judge=has_gold_judge(cfg))
    resumed = task.data.policy.extract(str(tmp_path / "resumed"))
    want, got = load_file(f"{straight.adapter_dir}/adapter_model.safetensors"), load_file(f"{resumed}/adapter_model.safetensors")
    want |= torch.load(f"{straight.adapter_dir}/value_head.pt")
    got |= torch.load(f"{resumed}/value_head.pt")
    assert set(want) == set(got)
    for name in want:  # the same operations in the same order on the CPU: equal up to rounding
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    for a, b in zip(straight.history, task.data.policy.history, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_mlflow_tells_the_truth_about_the_kills(flow_run):
    """One parent run for both Metaflow runs, FINISHED, naming both; the killed attempts' stage runs
    ended KILLED with the reason; no stage run left RUNNING; the version's lineage resolves."""
    run, _, _, faults = flow_run
    client = MlflowClient()
    stage_runs = _all_stage_runs(client, run)
    parent = client.get_run(stage_runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["metaflow.run_ids"] == f"{faults['origin_run_id']},{run.id}"
    assert parent.data.tags["metaflow.run_id"] == str(run.id)
    assert not [r for r in stage_runs if r.info.status == "RUNNING"]
    reinforce = sorted((r for r in stage_runs if r.data.tags["stage"] == "reinforce"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in reinforce] == ["KILLED", "KILLED", "FINISHED"]
    assert "attempt 0 of" in reinforce[0].data.tags["ended_because"]
    assert f"run {run.id} resumed it" in reinforce[1].data.tags["ended_because"]
    assert [r.data.tags["metaflow.pathspec"].split("/")[1] for r in reinforce] == [faults["origin_run_id"]] * 2 + [str(run.id)]
    assert [r.data.tags["metaflow.attempt"] for r in reinforce] == ["0", "1", "0"]
    assert reinforce[2].data.tags["resumed_at_batch"] == str(faults["run_killed_after"])
    # Stages cloned by the resume keep their runs (from the first Metaflow run), FINISHED.
    cloned = _stage_runs(client, run)["train_reward_model"].data.tags["metaflow.pathspec"]
    assert cloned.split("/")[1] == faults["origin_run_id"]

    tags = client.get_model_version("rlhf-policy", run["register"].task.data.model_version.version).tags
    assert tags["lineage.mlflow_parent_run_id"] == parent.info.run_id
    for key in ("lineage.reward_model_run_id", "lineage.ppo_run_id", "lineage.evaluate_run_id"):
        assert client.get_run(tags[key]).info.status == "FINISHED", key
    assert tags["lineage.ppo_run_id"] == reinforce[2].info.run_id
    exp = client.get_experiment_by_name("rlhf-lightning")
    found = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{tags['lineage.metaflow.run_id']}'")
    assert [r.info.run_id for r in found] == [parent.info.run_id]


def test_served_model_answers(flow_run):
    run, _, endpoint, _ = flow_run
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
    assert "Traceback" not in out and "Internal error" not in out
    # The parent run ended FAILED, saying where and why.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("rlhf-lightning").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure.step"] == "validate" and parent.data.tags["failure.kind"] == "expected"
    assert "data validation failed" in parent.data.tags["failure.reason"]


def test_a_bad_config_stops_the_flow_before_it_starts_with_its_message_and_no_traceback(tmp_path):
    """Metaflow parses the --config file while it reads the command line, where an exception prints a
    traceback: a config that fails its checks, or is not YAML, is said as the user's error (exit 2)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "USERNAME": "tester"}
    env.pop("MLFLOW_RUN_ID", None)
    for text, message in (("include: configs/tiny.yaml\ntrainer: {strategy: ddp}\n",
                           "error: config: trainer.strategy: ddp re-launches the whole Metaflow step; use ddp_spawn"),
                          ("trainer: [1\n", "error: config (the --config file): not valid YAML: while parsing")):
        (tmp_path / "cfg.yaml").write_text(text)
        done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg",
                               str(tmp_path / "cfg.yaml"), "run"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr[-2000:]
        assert "Traceback" not in done.stderr + done.stdout
        assert not (tmp_path / "mlflow.db").exists()  # stopped before the start step


def test_a_gpu_the_step_cannot_use_stops_the_run_with_what_to_change(tmp_path):
    """A container given a GPU (NVIDIA_VISIBLE_DEVICES, as the ECS GPU runtime sets it) that torch cannot
    use (here: there is none; on AWS, a driver too old for this torch build) would train on the CPU for
    hours: the first GPU step stops the run instead, saying which driver and instances work."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "USERNAME": "tester",
           "NVIDIA_VISIBLE_DEVICES": "GPU-5f1c"}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg",
                           str(REPO / "configs" / "tiny.yaml"), "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "rlhf-lightning stopped the run" in out, out[-3000:]
    assert "sample_builtin_task: this step was given GPU(s) (NVIDIA_VISIBLE_DEVICES=GPU-5f1c)" in out
    assert "R580 or newer" in out and "Traceback" not in out
