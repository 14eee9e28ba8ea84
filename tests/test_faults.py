"""MLflow stays true through failures, retries and resumes (tracking.begin_task / fail_parent, and the
flow's tracked_task around every step): on a real sqlite store, and in a small real Metaflow flow whose
gate fails. The SIGKILL-and-resume of the whole pipeline is in test_flow.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from rlhf_lightning import tracking
from rlhf_lightning.config import RLHFConfig

REPO = Path(__file__).resolve().parents[1]


def _dead_stage_run(parent: str, stage: str, *, run_id: str, pathspec: str, attempt: int) -> str:
    """A stage run as `stage_run` opens it, left RUNNING: what a SIGKILLed task leaves behind."""
    client = MlflowClient()
    with tracking.task_context(run_id=run_id, pathspec=pathspec, attempt=attempt):
        tags = {"mlflow.parentRunId": parent, "stage": stage, **tracking._task_tags()}
    return client.create_run(client.get_run(parent).info.experiment_id, run_name=stage, tags=tags).info.run_id


def test_a_resume_adopts_the_parent_and_ends_the_dead_runs_stage_runs(mlflow_tracking):
    client = MlflowClient()
    parent = tracking.start_parent_run(RLHFConfig(), flow_name="F", run_id="1")
    killed = _dead_stage_run(parent, "reinforce", run_id="1", pathspec="F/1/reinforce/7", attempt=0)

    ended = tracking.begin_task(parent, run_id="2", pathspec="F/2/reinforce/7", attempt=0)

    assert ended == [killed]
    run = client.get_run(killed)
    assert run.info.status == "KILLED"
    assert run.data.tags["ended_because"] == "its Metaflow run 1 stopped; run 2 resumed it"
    tags = client.get_run(parent).data.tags
    assert tags["metaflow.run_ids"] == "1,2" and tags["metaflow.run_id"] == "2"
    assert client.get_run(parent).info.status == "RUNNING"
    # A second task of the resumed run changes nothing more.
    assert tracking.begin_task(parent, run_id="2", pathspec="F/2/evaluate/8", attempt=0) == []
    assert client.get_run(parent).data.tags["metaflow.run_ids"] == "1,2"


def test_a_retry_ends_its_dead_attempt_but_not_a_parallel_branch(mlflow_tracking):
    client = MlflowClient()
    parent = tracking.start_parent_run(RLHFConfig(), flow_name="F", run_id="5")
    dead = _dead_stage_run(parent, "train_reward_model", run_id="5", pathspec="F/5/train_reward_model/3", attempt=0)
    branch = _dead_stage_run(parent, "prepare_prompts", run_id="5", pathspec="F/5/prepare_prompts/4", attempt=0)

    assert tracking.begin_task(parent, run_id="5", pathspec="F/5/train_reward_model/3", attempt=1) == [dead]
    assert client.get_run(dead).data.tags["ended_because"] == (
        "attempt 0 of F/5/train_reward_model/3 died; attempt 1 retries it")
    assert client.get_run(branch).info.status == "RUNNING"  # still running beside it


def test_a_failed_step_fails_the_parent_and_a_retry_revives_it(mlflow_tracking):
    client = MlflowClient()
    parent = tracking.start_parent_run(RLHFConfig(), flow_name="F", run_id="9")
    with tracking.task_context(run_id="9", pathspec="F/9/evaluate/12", attempt=0):
        tracking.fail_parent(parent, step="evaluate", reason="CUDA error: out of memory", expected=False)
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert tracking.recorded_failure(parent) == {"step": "evaluate", "reason": "CUDA error: out of memory",
                                                 "kind": "error", "metaflow_run_id": "9"}

    tracking.begin_task(parent, run_id="9", pathspec="F/9/evaluate/12", attempt=1)
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.data.tags["failure.previous"] == "9/evaluate: CUDA error: out of memory"
    assert tracking.recorded_failure(parent) == {}


def test_copy_metric_history_takes_the_points_below_the_checkpoint(mlflow_tracking):
    client = MlflowClient()
    exp = client.get_experiment_by_name("rlhf-lightning").experiment_id
    old, new = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.log_batch(old, metrics=[Metric("rm/train_loss", 1.0 / (s + 1), 0, s) for s in range(10)])
    assert tracking.copy_metric_history(old, new, below_step=6) == 6
    assert [(m.step, m.value) for m in client.get_metric_history(new, "rm/train_loss")] == [
        (s, 1.0 / (s + 1)) for s in range(6)]


GATE_FLOW = '''
import sys
sys.path.insert(0, {flows!r})
from metaflow import FlowSpec, current, retry, step
from remote import remote_ready


@remote_ready
class GateFlow(FlowSpec):
    @step
    def start(self):
        from rlhf_lightning import tracking
        from rlhf_lightning.config import RLHFConfig
        self.parent_run_id = tracking.start_parent_run(RLHFConfig(), flow_name="GateFlow", run_id=current.run_id)
        self.next(self.gate)

    @retry(times=2, minutes_between_retries=0)
    @step
    def gate(self):
        with open({attempts!r}, "a") as f:
            f.write("ran\\n")
        from rlhf_lightning.evaluation.gates import GateError
        raise GateError("held-out accuracy 0.41 < reward_model.min_eval_accuracy 0.60 (train longer)")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    GateFlow()
'''


def test_an_expected_failure_ends_the_run_failed_once_and_is_not_retrained(tmp_path):
    """A gate fails in a step with @retry: the step body runs once; the retries fail at once with the
    same message (no traceback, no second training); the parent run is FAILED with the step and reason."""
    flow = tmp_path / "gate_flow.py"
    attempts = tmp_path / "attempts"
    flow.write_text(textwrap.dedent(GATE_FLOW.format(flows=str(REPO / "flows"), attempts=str(attempts))))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "USERNAME": "tester"}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, str(flow), "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert attempts.read_text() == "ran\n", out[-3000:]  # attempts 1 and 2 did not run the step again
    assert out.count("gate: held-out accuracy 0.41 < reward_model.min_eval_accuracy 0.60 (train longer)") == 3
    assert out.count("not run again") == 2
    assert "Traceback" not in out and "Internal error" not in out

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("rlhf-lightning").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure.step"] == "gate" and parent.data.tags["failure.kind"] == "expected"
    assert parent.data.tags["failure.reason"].startswith("held-out accuracy 0.41")


@pytest.fixture(autouse=True)
def _no_project_run(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
