"""What makes the flow survive faults and keeps MLflow true about them.

- `tracked_task` (added to every step by `remote.remote_ready`) wraps each step:
  - before the step, it makes the MLflow records true: a `resume` logs into the original parent run,
    which records every Metaflow run id; stage runs whose task died (the killed run's, an earlier attempt's)
    are ended KILLED; a parent ended FAILED by an earlier attempt runs again;
  - when the step raises, it ends the parent FAILED with the step and the reason. An expected failure
    (bad config, bad data, a failed gate, a GPU the machine cannot use) then stops the run with its
    message and no traceback (a MetaflowException: Metaflow prints its message alone, locally and in a
    remote task's log), and a retry of it fails at once with the same message instead of training again
    to the same end. Anything else is a bug and keeps its traceback.
- `checkpoint_plan` says where a training step keeps its checkpoints: in the Metaflow datastore (the one
  storage every container of the run reaches, local or S3), per run and step. A retry of the step finds
  its own run's checkpoints; a `resume` also looks at the run it resumes.

Why not Metaflow's `@checkpoint` extension (metaflow-checkpoint): its default policy scopes checkpoints to
one task and ignores them in a new run, so `resume` (a new run) would start PPO again; its `eager` policy
loads the latest checkpoint of any earlier run of the flow, which can be an unrelated run with another
config. The resume we need (exactly the run being resumed, refused when its config or data differ) is a
few lines over the datastore, and it spares users an experimental dependency.
"""

from __future__ import annotations

from metaflow import current, user_step_decorator
from metaflow.exception import MetaflowException


class PipelineError(MetaflowException):
    """An expected failure (bad config, bad data, a gate): Metaflow prints its message, no traceback."""

    headline = "rlhf-lightning stopped the run"


def _parent_run_id(flow, inputs) -> str | None:
    """The MLflow parent run of this flow run, once `start` has made it (a join reads it from a branch)."""
    try:
        return inputs[0].parent_run_id if inputs else flow.parent_run_id
    except (AttributeError, KeyError, IndexError):
        return None


def _expected(exc: BaseException) -> bool:
    # Imported only when a step failed: `start`, `join` and `end` need no torch.
    from rlhf_lightning.config import ConfigError
    from rlhf_lightning.data.formats import DataError
    from rlhf_lightning.evaluation.gates import GateError
    from rlhf_lightning.hardware import HardwareError

    return isinstance(exc, (ConfigError, DataError, GateError, HardwareError))


@user_step_decorator
def tracked_task(step_name, flow, inputs=None, attributes=None):
    """MLflow bookkeeping around a step, and expected failures without a traceback (module docstring)."""
    from rlhf_lightning import tracking

    attempt = current.retry_count
    pathspec = f"{current.flow_name}/{current.run_id}/{step_name}/{current.task_id}"
    parent = _parent_run_id(flow, inputs)
    if current.get("is_parallel", False) and current.parallel.node_index != 0:
        # A node beside node 0 of a step over several (flows/nodes.py): node 0 keeps the MLflow records,
        # of its own task and of the step's failure (its processes fail with any other node's).
        parent = None
    if parent:
        failure = tracking.recorded_failure(parent)
        if (attempt > 0 and failure.get("kind") == "expected" and failure.get("step") == step_name
                and failure.get("metaflow_run_id") == str(current.run_id)):
            # Bad data, a bad config or a failed gate fail the same way on every attempt.
            raise PipelineError(f"{step_name}: {failure['reason']} (an earlier attempt failed this way; "
                                "not run again)")
        ended = tracking.begin_task(parent, run_id=str(current.run_id), pathspec=pathspec, attempt=attempt)
        if ended:
            print(f"MLflow: ended {len(ended)} stage run(s) of tasks that died as KILLED: {', '.join(ended)}")
    with tracking.task_context(run_id=str(current.run_id), pathspec=pathspec, attempt=attempt):
        try:
            yield
        except Exception as exc:
            expected = _expected(exc)
            if step_name == "start":  # `start` makes it
                parent = _parent_run_id(flow, inputs)
            if parent:
                tracking.fail_parent(parent, step=step_name, reason=str(exc) or type(exc).__name__,
                                     expected=expected)
            if expected:
                raise PipelineError(f"{step_name}: {exc}") from None
            raise


def checkpoint_root(flow) -> str:
    """`<datastore root>/rlhf_lightning/checkpoints`: the datastore this task writes its artifacts to
    (S3 on Batch and Kubernetes; the local `.metaflow` directory on one machine)."""
    # The task's own datastore, whichever `--datastore` chose; Metaflow has no public accessor for it.
    root = flow._datastore._storage_impl.datastore_root
    return f"{root.rstrip('/')}/rlhf_lightning/checkpoints"


def checkpoint_plan(flow):
    """Where the running training step saves checkpoints (`<root>/<flow>/<run id>/<step>`) and where it
    looks for one to resume from: there (a retry), then at the run a `resume` started from."""
    from rlhf_lightning.checkpoints import CheckpointPlan

    root = f"{checkpoint_root(flow)}/{current.flow_name}"
    save_to = f"{root}/{current.run_id}/{current.step_name}"
    resume_from = [save_to]
    if current.origin_run_id:
        resume_from.append(f"{root}/{current.origin_run_id}/{current.step_name}")
    return CheckpointPlan(save_to=save_to, resume_from=resume_from)
