"""MLflow conventions: one parent run per flow run, one nested run per stage.

Stage runs are created explicitly with the parent's id (``mlflow.parentRunId``) because each Metaflow
step is its own process: MLflow's in-process nesting cannot see the parent. ``MLFLOW_RUN_ID`` leaks into
child processes, so it is removed before any run is started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

from rlhf_lightning.config import ConfigError, RLHFConfig, flatten


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else MLflow's own default (sqlite `mlflow.db` in the working directory)."""
    return mlflow.get_tracking_uri()


def is_local_store(uri: str) -> bool:
    """Does the tracking URI name this machine's disk: MLflow's default (sqlite in the working
    directory), sqlite and file stores, plain paths? (`databricks` alone names a workspace.)"""
    scheme = urlparse(uri).scheme
    return scheme in ("file", "sqlite") or (scheme == "" and uri != "databricks")


def require_shared_tracking(remote_steps: list[str] | tuple[str, ...]) -> None:
    """Raise `ConfigError` when steps run on other machines (`remote_steps`) while the tracking URI
    names a file here: each would log into its own container's file and the next step would not find
    the parent run."""
    uri = tracking_uri()
    if not remote_steps or not is_local_store(uri):
        return
    where = "MLflow's default, " if not os.environ.get("MLFLOW_TRACKING_URI") else ""
    steps = ", ".join(remote_steps[:3]) + (f" and {len(remote_steps) - 3} more" if len(remote_steps) > 3 else "")
    raise ConfigError(
        f"steps {steps} run on other machines (--with batch / kubernetes), but MLflow "
        f"tracks to {uri} ({where}a file on one machine that the others cannot reach). Set "
        "MLFLOW_TRACKING_URI to a tracking server every step can reach before launching, e.g. "
        "`export MLFLOW_TRACKING_URI=http://mlflow.internal:5000` (`mlflow server`, or a managed "
        "MLflow); the flow carries it to every step."
    )


def start_parent_run(cfg: RLHFConfig, *, flow_name: str, run_id: str, tags: dict[str, str] | None = None) -> str:
    """Create the experiment (and with it the sqlite DB, once, before parallel steps race to create it)
    and the parent run; return its id. The run is left open until `end_parent_run`.

    Launched by `mlflow run` (MLflow Projects), the project's own run (`MLFLOW_RUN_ID`) becomes the
    parent instead of a second, empty run beside it."""
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    client = MlflowClient()
    tags = {"metaflow.flow_name": flow_name, "metaflow.run_id": str(run_id), **(tags or {})}
    if project_run:
        parent_id = project_run
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
    else:
        experiment = mlflow.set_experiment(cfg.registry.experiment)
        if "mlflow.experimentKind" not in experiment.tags:
            # What kind of experiment this is for MLflow 3's UI (training runs, not GenAI traces). Which page a
            # browser opens on is the UI's own mode, though: the links the run prints ask for the runs (ui_link).
            client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
        parent_id = client.create_run(experiment.experiment_id, run_name=f"{flow_name}-{run_id}", tags=tags).info.run_id
    items = [(k, str(v)[:500]) for k, v in flatten(cfg).items()]
    for i in range(0, len(items), 100):  # MLflow caps a log_batch at 100 params
        client.log_batch(parent_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return parent_id


def end_parent_run(parent_run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_run_id, status=status)


def summarise_parent_run(parent_run_id: str, metrics: dict[str, float], tags: dict[str, str], description: str) -> None:
    """The run a person opens first carries the headline: `metrics` and `tags` (the stage runs keep the
    detail), and `description` (Markdown) as the run's description in the MLflow UI."""
    client = MlflowClient()
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                             for k, v in metrics.items()],
                     tags=[mlflow.entities.RunTag(k, str(v)[:5000]) for k, v in
                           {**tags, "mlflow.note.content": description}.items()])


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at a run: its page on a tracking server, or the command that starts the UI on a
    local store (and where to click)."""
    # MLflow 3's UI opens in its GenAI mode (traces) unless the link asks for its model-training mode.
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000/{page})"


# The Metaflow task this process runs ({run_id, pathspec, attempt}), set by the flow around each step.
# Stage runs carry its pathspec (flow/run/step/task) and attempt as tags; `metaflow.run_id` stays the
# parent's alone, so that searching for it finds the parent.
_task: dict[str, str] = {}

FAILURE_TAGS = ("failure.step", "failure.reason", "failure.kind", "failure.metaflow_run_id")


@contextlib.contextmanager
def task_context(*, run_id: str, pathspec: str, attempt: int) -> Iterator[None]:
    """Stage runs created inside the block carry the Metaflow task that made them (so a later task can
    tell a stage run whose task died from one that is still running)."""
    _task.update(run_id=str(run_id), pathspec=pathspec, attempt=str(attempt))
    try:
        yield
    finally:
        _task.clear()


def _task_tags() -> dict[str, str]:
    return {"metaflow.pathspec": _task["pathspec"], "metaflow.attempt": _task["attempt"]} if _task else {}


def begin_task(parent_run_id: str, *, run_id: str, pathspec: str, attempt: int) -> list[str]:
    """A Metaflow task starts logging into `parent_run_id`: make the records true first.

    - A `resume` (a new Metaflow run id) logs into the same parent: the parent records every run id
      (`metaflow.run_ids`) and names the newest in `metaflow.run_id`.
    - A parent that was ended FAILED (an earlier attempt or run failed) runs again; the failure moves to
      `failure.previous`.
    - Stage runs still RUNNING whose task died (from another Metaflow run, or an earlier attempt of this
      task) are ended KILLED, with the reason in `ended_because`.

    Returns the ids of the stage runs it ended."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    run_ids = [r for r in tags.get("metaflow.run_ids", tags.get("metaflow.run_id", "")).split(",") if r]
    if str(run_id) not in run_ids:
        client.set_tag(parent_run_id, "metaflow.run_ids", ",".join([*run_ids, str(run_id)]))
        client.set_tag(parent_run_id, "metaflow.run_id", str(run_id))
    if parent.info.status != "RUNNING":
        if "failure.reason" in tags:
            client.set_tag(parent_run_id, "failure.previous",
                           f"{tags.get('failure.metaflow_run_id')}/{tags.get('failure.step')}: {tags['failure.reason']}"[:5000])
            for key in FAILURE_TAGS:
                if key in tags:
                    client.delete_tag(parent_run_id, key)
        client.update_run(parent_run_id, status="RUNNING")
    ended = []
    running = client.search_runs([parent.info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for child in running:
        t = child.data.tags
        child_run = t.get("metaflow.pathspec", "").split("/")[1:2]
        if child_run and child_run[0] != str(run_id):
            why = f"its Metaflow run {child_run[0]} stopped; run {run_id} resumed it"
        elif t.get("metaflow.pathspec") == pathspec and int(t.get("metaflow.attempt", attempt)) < attempt:
            why = f"attempt {t['metaflow.attempt']} of {pathspec} died; attempt {attempt} retries it"
        else:
            continue  # a task of this run that is still running (a parallel branch)
        client.set_tag(child.info.run_id, "ended_because", why)
        client.set_terminated(child.info.run_id, status="KILLED")
        ended.append(child.info.run_id)
    return ended


def fail_parent(parent_run_id: str, *, step: str, reason: str, expected: bool) -> None:
    """End the parent FAILED, saying which step failed and why (`failure.*` tags)."""
    client = MlflowClient()
    for key, value in (("failure.step", step), ("failure.reason", reason[:5000]),
                       ("failure.kind", "expected" if expected else "error"),
                       ("failure.metaflow_run_id", _task.get("run_id", ""))):
        client.set_tag(parent_run_id, key, value)
    client.set_terminated(parent_run_id, status="FAILED")


def recorded_failure(parent_run_id: str) -> dict[str, str]:
    """The parent's `failure.*` tags (empty when it has not failed)."""
    tags = MlflowClient().get_run(parent_run_id).data.tags
    return {key.split(".", 1)[1]: tags[key] for key in FAILURE_TAGS if key in tags}


def copy_metric_history(src_run_id: str, dst_run_id: str, below_step: int) -> int:
    """Copy every metric point of `src_run_id` logged at a step below `below_step` into `dst_run_id`
    (a resumed stage: the points its checkpoint covers). Returns the number of points copied."""
    client = MlflowClient()
    points = [m for key in client.get_run(src_run_id).data.metrics
              for m in client.get_metric_history(src_run_id, key) if m.step < below_step]
    for i in range(0, len(points), 1000):  # MLflow caps a log_batch at 1000 metrics
        client.log_batch(dst_run_id, metrics=points[i : i + 1000])
    return len(points)


@contextlib.contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one stage, active for the duration of the block; FAILED if it raises."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "stage": stage, **_task_tags()}
    child = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags)
    with mlflow.start_run(run_id=child.info.run_id) as active:
        yield active


def lightning_logger(run_id: str):
    """A Lightning MLFlowLogger writing into an existing run (so `self.log` lands in the stage run)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(tracking_uri=tracking_uri(), run_id=run_id, log_model=False)


def log_dict_artifact(data: Any, name: str) -> None:
    """Log a JSON document as an artifact of the active run."""
    mlflow.log_dict(data, name)


def log_rows_dataset(rows: list[dict], *, path: str, name: str, context: str) -> None:
    """Log a canonical dataset (rows already written to `path` as Parquet) with `mlflow.data`, so the run
    shows its schema, size and digest. `source` must be a real path."""
    import pandas as pd

    # Mappings (a prompt row's `extra` columns) as JSON text, as the Parquet file holds them.
    df = pd.DataFrame([{k: json.dumps(v, default=str) if isinstance(v, dict) else v for k, v in r.items()}
                       for r in rows])
    ds = mlflow.data.from_pandas(df, source=str(Path(path).resolve()), name=name)
    mlflow.log_input(ds, context=context)


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    """Log one file of this machine's disk as an artifact of the active run."""
    mlflow.log_artifact(path, artifact_path)


def log_artifacts(directory: str, artifact_path: str) -> None:
    """Log a directory (a model, an adapter) as artifacts of the active run."""
    mlflow.log_artifacts(directory, artifact_path)


def log_table(rows: list[dict], name: str) -> None:
    """Log rows as an MLflow table artifact of the active run (shown as a table in the UI)."""
    import pandas as pd

    mlflow.log_table(pd.DataFrame(rows), name)


def set_tags(tags: dict[str, Any]) -> None:
    """Tag the active run (values as text)."""
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def experiment_of(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id
