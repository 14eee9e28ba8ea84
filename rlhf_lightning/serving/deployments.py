"""`rlhf-local`: an MLflow deployments target that serves registered models with `mlflow models serve`.

MLflow has no local deployments target, so the project registers this one (entry point
`mlflow.deployments: rlhf-local`). It behaves like a remote target wherever it is used from:

- A deployment is a record in the Model Registry (a tag `deployment.rlhf-local.<name>` on the
  registered model it serves), so any process that reaches the tracking server sees it: the flow's
  `deploy` and `inference` steps may run in two different containers.
- The endpoint is `mlflow models serve` of the recorded version, started on this machine by the client
  that needs it (`predict`, or `run_local` in the foreground) and stopped by `close()`: a server never
  outlives the process that started it unless asked to (`close(keep_running=True)`).
- `create_deployment` load-checks the model: the server must start and answer /ping.

    mlflow deployments create -t rlhf-local --name rlhf-policy-candidate -m models:/rlhf-policy/3
    mlflow deployments predict -t rlhf-local --name rlhf-policy-candidate --input-path in.json
    mlflow deployments run-local -t rlhf-local --name rlhf-policy -m models:/rlhf-policy@champion -C port=5001

Config (`-C key=value`, or `serving.target_config` in the flow): `host` (127.0.0.1), `port` (0 = a
free port), `startup_timeout` (seconds, 240).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from rlhf_lightning.config import ServingConfig
from rlhf_lightning.serving.registry import ModelRef, RegistryError, resolve_model_uri
from rlhf_lightning.serving.pyfunc_model import is_chat_request
from rlhf_lightning.serving.server import ModelServer, invoke, predict_records, request_error

TARGET = "rlhf-local"
PLUGINS = {TARGET: __name__, "rlhf-vllm": "rlhf_lightning.serving.vllm_deployments"}
"""The deployments targets this package provides (entry points `mlflow.deployments`)."""
DEFAULTS = {"host": "127.0.0.1", "port": 0, "startup_timeout": 240.0}


def _settings(config: dict | None, target: str = TARGET, defaults: dict[str, Any] = DEFAULTS) -> dict[str, Any]:
    unknown = sorted(set(config or {}) - set(defaults))
    if unknown:
        raise MlflowException(f"{target}: unknown config key(s) {unknown}; valid: {sorted(defaults)}",
                              INVALID_PARAMETER_VALUE)
    merged = {**defaults, **(config or {})}
    # `-C port=5001` on the command line gives strings: each value takes its default's type.
    out = {}
    for key, default in defaults.items():
        try:
            out[key] = type(default)(merged[key])
        except (TypeError, ValueError):
            raise MlflowException(f"{target}: config {key}={merged[key]!r} must be a {type(default).__name__} "
                                  f"(default {default!r})", INVALID_PARAMETER_VALUE) from None
    return out


def _registered_version(model_uri: str, target: str = TARGET) -> ModelRef:
    """The registered version a `models:/` URI names now, or the MLflow error a deployments client raises."""
    try:
        resolved = resolve_model_uri(model_uri)
    except RegistryError as exc:
        raise MlflowException(str(exc), RESOURCE_DOES_NOT_EXIST) from None
    if resolved is None:
        raise MlflowException(f"{target} deploys registered models (models:/NAME/VERSION or models:/NAME@ALIAS), "
                              f"got {model_uri!r}; register it first", INVALID_PARAMETER_VALUE)
    return resolved


class LocalDeploymentClient(BaseDeploymentClient):
    """Deployments recorded in the Model Registry, served on demand by `mlflow models serve`. Another
    target that serves registered versions on this machine (rlhf-vllm) sets `target`, `defaults` and
    `_server`."""

    target = TARGET
    defaults = DEFAULTS

    @property
    def tag_prefix(self) -> str:
        return f"deployment.{self.target}."

    def _server(self, model_uri: str, settings: dict[str, Any]) -> ModelServer:
        """The (not yet started) server of `model_uri`."""
        return ModelServer(model_uri, **settings)

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        self._registry = MlflowClient()
        self._servers: dict[str, ModelServer] = {}

    # ------------------------------------------------------------- records

    def _records(self) -> dict[str, dict]:
        out, token = {}, None
        while True:  # every page of the registry
            page = self._registry.search_registered_models(page_token=token)
            for model in page:
                for key, value in model.tags.items():
                    if key.startswith(self.tag_prefix):
                        out[key.removeprefix(self.tag_prefix)] = json.loads(value)
            token = page.token
            if not token:
                return out

    def _write(self, name: str, model_uri: str, config: dict | None, old: dict | None = None) -> dict:
        """Load-check and record `name` -> `model_uri`; `old` is the record it replaces, if any."""
        model, version = _registered_version(model_uri, self.target)
        settings = _settings(config, self.target, self.defaults)
        # Load check: the version must start and answer its health check before it is recorded as deployed.
        with self._server(f"models:/{model}/{version}", settings):
            pass
        record = {"name": name, "target": self.target, "model_name": model, "version": str(version),
                  "model_uri": f"models:/{model}/{version}", "config": settings, "updated_at": time.time()}
        if old is not None and old["model_name"] != model:  # the name moves to another registered model
            self._registry.delete_registered_model_tag(old["model_name"], self.tag_prefix + name)
        self._registry.set_registered_model_tag(model, self.tag_prefix + name, json.dumps(record))
        return record

    # ------------------------------------------------------------- BaseDeploymentClient

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        if name in self._records():
            raise MlflowException(f"{self.target} deployment {name!r} exists; use update_deployment",
                                  INVALID_PARAMETER_VALUE)
        return self._write(name, model_uri, config)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        old = self.get_deployment(name)
        self.close_server(name)  # a running server would keep the old weights
        return self._write(name, model_uri or old["model_uri"], config if config is not None else old["config"], old)

    def delete_deployment(self, name, config=None, endpoint=None):
        record = self._records().get(name)
        self.close_server(name)
        if record is not None:
            self._registry.delete_registered_model_tag(record["model_name"], self.tag_prefix + name)

    def list_deployments(self, endpoint=None):
        return list(self._records().values())

    def get_deployment(self, name, endpoint=None):
        record = self._records().get(name)
        if record is None:
            raise MlflowException(f"no {self.target} deployment named {name!r}; create it with "
                                  f"`mlflow deployments create -t {self.target} --name {name} -m models:/...`",
                                  RESOURCE_DOES_NOT_EXIST)
        return record

    def predict(self, deployment_name=None, inputs=None, endpoint=None, params: dict | None = None):
        """Answers of the deployment, as `{"predictions": [...]}`. `inputs`: a DataFrame, a list of row
        dicts, or a dict of one row; a Chat Completions body (`{"messages": [...], "max_tokens": ...}`)
        is answered as one (`choices`, `usage`). On failure, with the server's message: rows raise
        `ServingError`; a Chat Completions body raises as `server.request_error` says (4xx: MlflowException)."""
        if is_chat_request(inputs):
            result = invoke(self.serve(deployment_name), {**inputs, **(params or {})})
            if result.status != 200:
                raise request_error(result.status, result.error_message)
            return PredictionsResponse(result.body)
        if isinstance(inputs, pd.DataFrame):
            records = inputs.to_dict(orient="records")
        else:
            records = [inputs] if isinstance(inputs, dict) else list(inputs)
        return PredictionsResponse({"predictions": predict_records(self.serve(deployment_name), records, params)})

    # ------------------------------------------------------------- the server

    def serve(self, name: str) -> str:
        """Start (once per client) the server of deployment `name`; return its URL."""
        if name not in self._servers:
            record = self.get_deployment(name)
            server = self._server(record["model_uri"], record["config"])
            server.__enter__()
            self._servers[name] = server
        return self._servers[name].url

    def close_server(self, name: str) -> None:
        server = self._servers.pop(name, None)
        if server is not None:
            server.stop()

    def close(self, keep_running: bool = False) -> dict[str, dict]:
        """Stop the servers this client started, or leave them up (`keep_running`) and return
        {deployment name: {"url", "pid"}} of each left running."""
        left = {name: {"url": s.url, "pid": s.pid} for name, s in self._servers.items()} if keep_running else {}
        if not keep_running:
            for name in list(self._servers):
                self.close_server(name)
        self._servers.clear()
        return left


def get_client(target: str) -> BaseDeploymentClient:
    """`mlflow.deployments.get_deploy_client(target)`, with this module registered as `rlhf-local`.

    The entry point registers it wherever the project is installed (the `mlflow deployments` CLI), but
    inside a Metaflow task the library is imported from the code package, whose recorded distribution
    carries no entry points and hides the installed one; so register it here too, the way MLflow
    registers its own SageMaker target."""
    from mlflow.deployments import get_deploy_client
    from mlflow.deployments.interface import plugin_store

    for name, module in PLUGINS.items():
        if name not in plugin_store.registry:
            plugin_store.register(name, module)
    return get_deploy_client(target)


def deployment_config(serving: ServingConfig) -> dict[str, Any]:
    """The deployment config `serving` gives its target: rlhf-local's host, port and startup timeout, then
    `serving.target_config` (another target's own keys, or rlhf-local ones that override)."""
    local = {}
    if serving.target in PLUGINS:
        local = {"host": serving.host, "port": serving.port}
        if serving.startup_timeout is not None:
            local["startup_timeout"] = serving.startup_timeout
    return {**local, **serving.target_config}


def create_or_update(client: BaseDeploymentClient, name: str, model_uri: str, config: dict[str, Any]) -> bool:
    """Deploy `model_uri` as `name`: create the deployment, or update it when it exists (True then)."""
    try:
        client.get_deployment(name)
    except MlflowException:
        client.create_deployment(name, model_uri, config=config)
        return False
    client.update_deployment(name, model_uri=model_uri, config=config)
    return True


def run_local(name, model_uri, flavor=None, config=None):
    """Serve `model_uri` in the foreground until interrupted (`mlflow deployments run-local`)."""
    with ModelServer(model_uri, **_settings(config)) as server:
        print(f"{TARGET}: serving {model_uri} as {name!r} at {server.url} (Ctrl-C stops it)", flush=True)
        server.serve_forever()


def target_help():
    return __doc__
