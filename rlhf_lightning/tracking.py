"""MLflow conventions: one parent run per flow run, one nested run per stage.

Stage runs are created explicitly with the parent's id (``mlflow.parentRunId``) because each Metaflow
step is its own process: MLflow's in-process nesting cannot see the parent. ``MLFLOW_RUN_ID`` leaks into
child processes, so it is removed before any run is started here.
"""

from __future__ import annotations

import contextlib
import json
import os
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
        parent_id = client.create_run(experiment.experiment_id, run_name=f"{flow_name}-{run_id}", tags=tags).info.run_id
    items = [(k, str(v)[:500]) for k, v in flatten(cfg).items()]
    for i in range(0, len(items), 100):  # MLflow caps a log_batch at 100 params
        client.log_batch(parent_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return parent_id


def end_parent_run(parent_run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_run_id, status=status)


@contextlib.contextmanager
def stage_run(parent_run_id: str, stage: str, *, metaflow_pathspec: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one stage, active for the duration of the block; FAILED if it raises."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "stage": stage}
    if metaflow_pathspec:
        tags["metaflow.pathspec"] = metaflow_pathspec
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

    df = pd.DataFrame(rows)
    ds = mlflow.data.from_pandas(df, source=str(Path(path).resolve()), name=name)
    mlflow.log_input(ds, context=context)


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def write_json(data: Any, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return str(path)
