"""What makes the flow run the same on a laptop and in fresh containers (AWS Batch, Kubernetes).

A remote task shares nothing with the launcher but Metaflow artifacts, the datastore and the MLflow
tracking server. `remote_ready` makes the flow carry what a task needs across that boundary:

- the environment the pipeline reads (tracking URI, hub settings): Batch and Kubernetes jobs get
  Metaflow's own variables only, so every step gets an `@environment` with the launcher's values;
- the slow caches (the dequantised policy, the built-in task's samples), through the datastore;
- the configs, in the code package beside the flow (Metaflow packages only .py files by default), and
  the local data files the config names (`resolve_data_sources` points the config at them remotely).
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from faults import tracked_task  # flows/faults.py
from metaflow import environment, user_step_decorator
from metaflow.packaging_sys import ContentType
from metaflow.user_decorators.user_flow_decorator import FlowMutator

from rlhf_lightning.config import SOURCE_ROLES

REPO = Path(__file__).resolve().parents[1]

# Read by the pipeline in every step. Secrets (MLFLOW_TRACKING_TOKEN/PASSWORD, HF_TOKEN) are not
# carried as plain job variables, which anyone who can describe the job reads: give them to the steps
# with `--with secrets:sources=[...]` (docs/scaling-out.md). Paths of the launching machine
# (RLHF_LIGHTNING_CACHE, HF_HOME) mean nothing in a container and are not carried either.
CARRIED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)

# Step decorators that run a task on another machine.
REMOTE_DECORATORS = ("batch", "kubernetes")


def carried_environment(environ=os.environ) -> dict[str, str]:
    """The variables of CARRIED_ENV, plus those named in RLHF_LIGHTNING_CARRY_ENV (comma-separated),
    that are set here (at launch), to set again in every task."""
    extra = [n.strip() for n in environ.get("RLHF_LIGHTNING_CARRY_ENV", "").split(",") if n.strip()]
    return {name: environ[name] for name in (*CARRIED_ENV, *extra) if environ.get(name)}


def packaged_configs() -> list[tuple[str, str]]:
    """(path, name in the code package) of every config file: `configs/<name>.yaml` beside the flow."""
    return [(str(p), f"configs/{p.name}") for p in sorted((REPO / "configs").glob("*.yaml"))]


def _local(source: str) -> bool:
    return not source.startswith(("s3://", "hf:"))


def packaged_source(source: str) -> tuple[str, str]:
    """(directory the source's files are taken from, the source as named in the code package) of a local
    path or glob. The part before the first glob character is the directory; the package keeps the rest
    under `data/<hash of that directory>/`, so equal file names from two directories never collide."""
    head = source.split("*")[0].split("?")[0].split("[")[0]
    base = os.path.dirname(head) or "."
    # The directory as written: the launcher and the remote task (another working directory) agree on it.
    digest = hashlib.sha1(os.path.normpath(base).encode()).hexdigest()[:10]
    return base, f"data/{digest}/{os.path.relpath(source, base)}"


def packaged_data(data_config: dict) -> list[tuple[str, str]]:
    """(path, name in the code package) of every local file the config's data sources name, as found
    from the launch directory (relative paths start there, as in a local run)."""
    files = []
    for key in SOURCE_ROLES:
        for source in filter(_local, data_config.get(key, [])):
            base, named = packaged_source(source)
            root = os.path.dirname(named)
            for path in sorted(glob.glob(source, recursive=True)):
                if os.path.isfile(path):
                    files.append((os.path.abspath(path), f"{root}/{os.path.relpath(path, base)}"))
    return files


def resolve_data_sources(data_config: dict) -> dict:
    """The config's data section with each local source that matches nothing here (a remote task, whose
    working directory is the code package) pointed at its copy in the package."""

    def resolve(source: str) -> str:
        if not _local(source) or glob.glob(source, recursive=True):
            return source
        packaged = packaged_source(source)[1]
        return packaged if glob.glob(packaged, recursive=True) else source  # else: preprocess reports it

    return {**data_config, **{key: [resolve(s) for s in data_config.get(key, [])] for key in SOURCE_ROLES}}


def datastore_cache() -> dict[str, str]:
    """Where the library shares its slow caches (rlhf_lightning.cache): a folder of the Metaflow datastore
    when that is S3, reached through the same endpoint as Metaflow's own S3 client. Empty for a local
    datastore: one machine, one disk, the local caches suffice."""
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3, DEFAULT_DATASTORE, S3_ENDPOINT_URL

    if DEFAULT_DATASTORE != "s3" or not DATASTORE_SYSROOT_S3:
        return {}
    env = {"RLHF_LIGHTNING_SHARED_CACHE": f"{DATASTORE_SYSROOT_S3.rstrip('/')}/rlhf_lightning_cache"}
    if S3_ENDPOINT_URL:
        env["AWS_ENDPOINT_URL_S3"] = S3_ENDPOINT_URL
    return env


@user_step_decorator
def shared_caches(step_name, flow, inputs=None, attributes=None):
    """Inside the task, wherever it runs: point the library's caches at the datastore (values set
    explicitly win)."""
    for name, value in datastore_cache().items():
        os.environ.setdefault(name, value)
    yield


class remote_ready(FlowMutator):
    """Flow decorator: carry CARRIED_ENV into every step, share the slow caches through the datastore,
    put the configs into the code package, and keep MLflow true about failures and retries
    (faults.tracked_task: expected failures without a traceback)."""

    def pre_mutate(self, mutable_flow) -> None:
        # Local data files the config names travel in the code package (read where the run is launched).
        self.data_files = [f for _, config in mutable_flow.configs for f in packaged_data(config.to_dict()["data"])]
        carried = carried_environment()
        for _, step in mutable_flow.steps:
            step.add_decorator(shared_caches)
            step.add_decorator(tracked_task)
            if carried:
                step.add_decorator(environment, deco_kwargs={"vars": carried})

    def add_to_package(self):
        for path, name in packaged_configs() + self.data_files:
            yield path, name, ContentType.USER_CONTENT


def remote_steps(flow) -> list[str]:
    """Names of the steps of `flow` that run on another machine (`--with batch`, `@kubernetes`, ...),
    in the flow's order."""
    # The graph, not `for step in flow` (a legacy iterator in no particular order).
    return [name for name in flow._graph.sorted_nodes
            if any(d.name in REMOTE_DECORATORS for d in getattr(flow, name).decorators)]
