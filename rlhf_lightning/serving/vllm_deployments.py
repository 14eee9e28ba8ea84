"""`rlhf-vllm`: an MLflow deployments target that serves registered policy versions with vLLM's
OpenAI-compatible server: the Chat Completions API clients already call (the `openai` package, LangChain,
LlamaIndex), streaming, and continuous batching of concurrent requests.

Deployments are records in the Model Registry, as `rlhf-local`'s are (tag `deployment.rlhf-vllm.<name>`),
so the flow's `deploy` and `inference` steps may run in different containers; the server is started by
the client that needs it (`predict`, `predict_stream`, or `run_local` in the foreground) and stopped by
`close()`. `create_deployment` load-checks the version: vLLM must start and answer /health.

    mlflow deployments create -t rlhf-vllm --name rlhf-policy -m models:/rlhf-policy@champion
    mlflow deployments run-local -t rlhf-vllm --name rlhf-policy -m models:/rlhf-policy@champion -C port=8000
    python -m rlhf_lightning serve --target rlhf-vllm --port 8000     # the same, by hand
    # then any OpenAI client: base_url http://127.0.0.1:8000/v1, model "rlhf-policy/<version>"

The version is served under the name `NAME/VERSION`: on a GPU its base as stored plus its adapter as a
LoRA module of that name; on a CPU the adapter merged into the base (see `vllm_server`). `predict` takes a
Chat Completions body (answered as one), or request rows `{prompt}` / `{messages}` with the params
`rlhf-local` takes (answered as rows, `weights_sha256` read from the directory the server serves), so the
flow's inference checks run unchanged.

Config (`-C key=value`, or `serving.target_config`): `host` (127.0.0.1), `port` (0 = a free port),
`startup_timeout` (seconds, 600), `adapter` (auto | lora | merge), `dtype` (auto | bfloat16 | float16 |
float32), `enforce_eager` (auto = on a CPU), `kv_cache_gib` (a CPU's KV cache in whole GiB, 2), `max_model_len`
(0 = the model's), `extra_args` (more `vllm serve` flags, one string). vLLM is an optional install: the
CUDA build with `pip install .[vllm]`, the CPU build as `make setup` installs it.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
from mlflow.deployments import PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rlhf_lightning.serving import deployments as _local
from rlhf_lightning.serving.pyfunc_model import conversations, is_chat_request, row_seed, validate_params

TARGET = "rlhf-vllm"
DEFAULTS = {"host": "127.0.0.1", "port": 0, "startup_timeout": 600.0, "adapter": "auto", "dtype": "auto",
            "enforce_eager": "auto", "kv_cache_gib": 2, "max_model_len": 0, "extra_args": ""}


def _vllm_server():
    if importlib.util.find_spec("vllm") is None:
        raise MlflowException(f"{TARGET} needs vLLM: `pip install .[vllm]` on a GPU host; on a CPU, vLLM's CPU build "
                              "(`make setup` installs it where pip reaches PyTorch's CPU index)", INVALID_PARAMETER_VALUE)
    from rlhf_lightning.serving import vllm_server

    return vllm_server


class VLLMDeploymentClient(_local.LocalDeploymentClient):
    """Deployments recorded in the Model Registry, served on demand by vLLM's OpenAI server."""

    target = TARGET
    defaults = DEFAULTS

    def _server(self, model_uri: str, settings: dict[str, Any]):
        name, version = _local._registered_version(model_uri, TARGET)
        return _vllm_server().VLLMServer(name, version, **settings)

    def served_name(self, deployment_name: str) -> str:
        record = self.get_deployment(deployment_name)
        return f"{record['model_name']}/{record['version']}"

    def predict(self, deployment_name=None, inputs=None, endpoint=None, params: dict | None = None):
        """A Chat Completions body is answered with the server's Chat Completions response; request rows
        (a DataFrame, a list of row dicts or prompt strings) with rows as `rlhf-local` answers them: one
        chat completion each, sent together so the engine batches them."""
        vs = _vllm_server()
        url, model = self.serve(deployment_name), self.served_name(deployment_name)
        if is_chat_request(inputs):
            return PredictionsResponse(vs.chat_completions(url, {**inputs, **(params or {}), "model": model}))
        gen = validate_params(params)
        chats = conversations(inputs.to_dict("records") if isinstance(inputs, pd.DataFrame) else inputs)
        sha = vs.served_sha256(url, model)
        body = {"model": model, "max_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p}

        def one(i: int) -> dict[str, Any]:
            seed = {} if gen.seed is None else {"seed": row_seed(gen.seed, i)}
            out = vs.chat_completions(url, {**body, **seed, "messages": chats[i]})
            choice = out["choices"][0]
            return {"response": (choice["message"]["content"] or "").strip(), "prompt_tokens": out["usage"]["prompt_tokens"],
                    "completion_tokens": out["usage"]["completion_tokens"], "finish_reason": choice["finish_reason"],
                    "weights_sha256": sha}

        with ThreadPoolExecutor(min(len(chats), 16)) as pool:
            return PredictionsResponse({"predictions": list(pool.map(one, range(len(chats))))})

    def predict_stream(self, deployment_name=None, inputs=None, endpoint=None):
        """The chunks of a streamed Chat Completions request (`inputs`: its body), as the server sends them."""
        if not is_chat_request(inputs):
            raise MlflowException("predict_stream takes a Chat Completions body: {\"messages\": [...], ...}",
                                  INVALID_PARAMETER_VALUE)
        vs = _vllm_server()
        url, model = self.serve(deployment_name), self.served_name(deployment_name)
        yield from vs.stream_chat_completions(url, {**inputs, "model": model})


def run_local(name, model_uri, flavor=None, config=None):
    """Serve `model_uri` with vLLM in the foreground until interrupted (`mlflow deployments run-local`)."""
    model, version = _local._registered_version(model_uri, TARGET)
    with _vllm_server().VLLMServer(model, version, **_local._settings(config, TARGET, DEFAULTS)) as server:
        print(f"{TARGET}: serving {model_uri} as {name!r} at {server.url}/v1 (OpenAI API; model "
              f"{server.served_name!r}; Ctrl-C stops it)", flush=True)
        server.serve_forever()


def target_help():
    return __doc__
