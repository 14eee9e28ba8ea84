"""A registered policy version served by vLLM's OpenAI-compatible server (the `rlhf-vllm` target's endpoint).

vLLM serves the Chat Completions API clients already call (`/v1/chat/completions`, streaming included)
with continuous batching. It cannot run the version's pyfunc, so the version is unpacked for it first
(:func:`prepare`):

- the version's artifacts are downloaded; the adapter's sha256 must equal the one registered with it;
- `lora` mode (GPUs): the version's base as stored, and its adapter as a LoRA module named after the
  version (`rlhf-policy/3`), written in the engine's dtype (vLLM refuses adapters in another dtype);
- `merge` mode (CPUs, where vLLM's LoRA kernels generate about 5x slower than the plain model): the adapter
  merged into the base once, saved as one model named after the version;
- the template the policy was trained with is the one the server applies.

Everything is written under a directory named by the adapter's sha256 (`.../sha256-<hex>/`), in one
rename, after the adapter was checked against the registered hash. The server reports the directory it
serves (`/v1/models`: `root`), so a client reads from the endpoint itself which version's weights answer
(:func:`served_sha256`), as the pyfunc's answers carry the hash. The files there (the merged model, or the
adapter in the engine's dtype) are derived from the checked adapter and are not hashed again on reuse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rlhf_lightning.serving.pyfunc_model import ADAPTER_WEIGHTS_FILE, RLHFPolicyModel, manifest_digest, sha256_file
from rlhf_lightning.serving.server import ModelServer, ServingError, request_error

CACHE_ENV = "RLHF_VLLM_CACHE"
"""Where prepared versions are kept (default ~/.cache/rlhf-lightning/vllm)."""
SHA_DIR = re.compile(r"sha256-([0-9a-f]{64})")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf-lightning" / "vllm")


@dataclass(frozen=True)
class Prepared:
    """A version unpacked for vLLM: what the server is started with."""

    served_name: str          # the name clients ask for: NAME/VERSION
    model_dir: str            # --model: the merged model, or the base (lora mode)
    tokenizer_dir: str
    adapter_dir: str | None   # lora mode: the LoRA module's directory
    lora_rank: int
    mode: str                 # lora | merge
    weights_sha256: str
    chat_template: str        # file holding the template the policy was trained with


def adapter_mode(name: str = "auto") -> str:
    """`adapter`: auto = a LoRA module on a GPU, merged on a CPU (as the training engine decides)."""
    from rlhf_lightning.vllm_settings import adapter_sync_mode

    if name not in ("auto", "lora", "merge"):
        raise MlflowException(f"adapter={name!r}: use auto, lora or merge", INVALID_PARAMETER_VALUE)
    return adapter_sync_mode(name)


def prepare(name: str, version: str, mode: str, dtype: str) -> Prepared:
    """Unpack registered version `name`/`version` for vLLM (see the module doc), or reuse what an earlier
    call left in the cache for the same weights."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}",
                                                     dst_path=tempfile.mkdtemp(prefix="rlhf-vllm-")))
    try:
        flavor = Model.load(str(local)).flavors["python_function"]
        config = flavor.get("model_config") or {}
        artifacts = {key: str(local / spec["path"]) for key, spec in (flavor.get("artifacts") or {}).items()}
        if "adapter" not in artifacts:
            raise MlflowException(f"models:/{name}/{version} is not an rlhf-lightning policy (no adapter artifact)",
                                  INVALID_PARAMETER_VALUE)
        sha = sha256_file(Path(artifacts["adapter"]) / ADAPTER_WEIGHTS_FILE)
        if config.get("weights_sha256") and config["weights_sha256"] != sha:
            raise MlflowException(f"models:/{name}/{version}: adapter sha256 {sha} differs from the registered "
                                  f"{config['weights_sha256']}; the stored version is corrupt or was modified")
        base_dir = RLHFPolicyModel.base_dir(artifacts)
        tokenizer_dir = artifacts.get("tokenizer") or base_dir
        rank = int(json.loads((Path(artifacts["adapter"]) / "adapter_config.json").read_text())["r"])
        # The adapter's hash names the directory; what else shapes the files (the chat template, the
        # tokenizer) is in the key too, so a version with the same adapter and another template is not
        # served from the other's files.
        extra = manifest_digest({"chat_template": str(config.get("chat_template")), **_tokenizer_files(tokenizer_dir)})
        root = cache_dir() / f"sha256-{sha}" / f"{mode}-{dtype}-{extra[:16]}"
        if not (root / "prepared.json").is_file():
            # base_ref: the base lives in the machine's base cache (or the hub's); `base`: in this download.
            _write(root, mode, dtype, base_dir, artifacts["adapter"], tokenizer_dir, config.get("chat_template"),
                   base_shared="base" not in artifacts)
        done = json.loads((root / "prepared.json").read_text())
        # A LoRA module on a shared base: the base as this call fetched and checked it (the machine's base
        # cache may have moved since the directory was prepared).
        model_dir = base_dir if mode == "lora" and "base" not in artifacts else done["model_dir"]
        return Prepared(served_name=f"{name}/{version}", model_dir=model_dir, tokenizer_dir=done["tokenizer_dir"],
                        adapter_dir=done["adapter_dir"], lora_rank=rank, mode=mode, weights_sha256=sha,
                        chat_template=done["chat_template"])
    finally:
        shutil.rmtree(local, ignore_errors=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def _tokenizer_files(directory: str) -> dict[str, str]:
    """{name: sha256} of a directory's top-level files other than weights (a tokenizer's files; the
    tokenizer may be read from the base's own directory)."""
    return {f.name: sha256_file(f) for f in sorted(Path(directory).iterdir())
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES)}


def _write(root: Path, mode: str, dtype: str, base_dir: str, adapter_dir: str, tokenizer_dir: str,
           chat_template: str | None, base_shared: bool) -> None:
    import torch
    from transformers import AutoTokenizer

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root.parent))
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if chat_template:
            tok.chat_template = chat_template
        (tmp / "chat_template.jinja").write_text(tok.chat_template or "")
        if mode == "merge":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            # Merged in fp32, then stored in the engine's dtype: W0 + BA rounded once, not twice.
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            merged.to(getattr(torch, dtype)).save_pretrained(tmp / "merged")
            tok.save_pretrained(tmp / "merged")
            model_dir, tok_dir, lora_dir = root / "merged", root / "merged", None
        else:
            # Only the adapter's own files (the run also keeps its value head there), in the engine's dtype.
            from safetensors.torch import load_file, save_file

            (tmp / "adapter").mkdir()
            shutil.copy(Path(adapter_dir) / "adapter_config.json", tmp / "adapter")
            tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE))
            if dtype != "auto":
                tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
            save_file(tensors, str(tmp / "adapter" / ADAPTER_WEIGHTS_FILE))
            tok.save_pretrained(tmp / "tokenizer")
            model_dir, tok_dir, lora_dir = Path(base_dir), root / "tokenizer", root / "adapter"
            if not base_shared:  # a base inside the version's download, which goes away: keep a copy
                shutil.copytree(base_dir, tmp / "base")
                model_dir = root / "base"
        (tmp / "prepared.json").write_text(json.dumps({
            "model_dir": str(model_dir), "tokenizer_dir": str(tok_dir),
            "adapter_dir": None if lora_dir is None else str(lora_dir),
            "chat_template": str(root / "chat_template.jinja")}))
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "prepared.json").is_file():  # another process prepared the same weights first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class VLLMServer(ModelServer):
    """vLLM's OpenAI-compatible server of one registered version, as a context manager (start, wait for
    /health, stop the whole process group), like `ModelServer`.

    `settings`: `adapter` (auto | lora | merge), `dtype` (auto: bf16 where the device computes in it),
    `enforce_eager` (auto: on a CPU, where compiling takes minutes at start for ~10% more tokens/s),
    `kv_cache_gib` (a CPU's KV cache), `max_model_len` (0: the model's), `extra_args` (more `vllm serve`
    flags, as one string)."""

    label = "vLLM's OpenAI server"
    health_path = "/health"

    def __init__(self, name: str, version: str, *, adapter: str = "auto", dtype: str = "auto",
                 enforce_eager: str = "auto", kv_cache_gib: int = 2, max_model_len: int = 0, extra_args: str = "",
                 **server_args):
        super().__init__(f"models:/{name}/{version}", **server_args)
        self._env = dict(self._env)  # settings below go to the child, not into the caller's dict
        import torch

        from rlhf_lightning.vllm_settings import engine_dtype

        self.cuda = torch.cuda.is_available()
        self.mode = adapter_mode(adapter)
        self.dtype = engine_dtype(dtype)
        self.eager = (not self.cuda) if enforce_eager == "auto" else str(enforce_eager).lower() in ("1", "true", "yes")
        self.max_model_len, self.extra_args = int(max_model_len), str(extra_args)
        self.prepared = prepare(name, version, self.mode, self.dtype)
        self.lora_rank = 0
        if self.prepared.mode == "lora":
            from rlhf_lightning.vllm_settings import EngineError, max_lora_rank

            try:
                self.lora_rank = max_lora_rank(self.prepared.lora_rank)
            except EngineError as exc:  # the adapter's rank is the version's: say it before starting
                raise MlflowException(str(exc).replace("generation.max_lora_rank: ", ""), INVALID_PARAMETER_VALUE) from None
        if not self.cuda and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            self._env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))  # whole GiB only
        if not self.cuda:
            from rlhf_lightning.vllm_settings import cpu_binding

            for key, value in cpu_binding(os.environ, os.sched_getaffinity(0)).items():
                self._env.setdefault(key, value)

    @property
    def served_name(self) -> str:
        return self.prepared.served_name

    def command(self) -> list[str]:
        p = self.prepared
        # The api_server module, not the `vllm` CLI: the CLI reads the version of a distribution named
        # `vllm`, and vLLM's CPU build is installed as `vllm-cpu`.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", p.model_dir,
               "--tokenizer", p.tokenizer_dir, "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
               "--chat-template", p.chat_template, "--generation-config", "auto"]
        if p.mode == "lora":
            # The base answers as NAME/VERSION:base; the version itself is the LoRA module.
            cmd += ["--served-model-name", f"{p.served_name}:base", "--enable-lora",
                    "--lora-modules", f"{p.served_name}={p.adapter_dir}", "--max-lora-rank", str(self.lora_rank)]
        else:
            cmd += ["--served-model-name", p.served_name]
        if self.eager:
            cmd.append("--enforce-eager")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + self.extra_args.split()

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "served_name": self.served_name, **asdict(self.prepared)}


# ------------------------------------------------------------------ the OpenAI API, as clients call it


def _request(url: str, body: dict | None = None, timeout: float = 300.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        raw = err.read().decode("utf-8", errors="replace")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
        raise request_error(err.code, message, f"POST {url} -> ") from None
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServingError(f"{url}: {exc}") from None


def chat_completions(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """POST a Chat Completions body to the server; its response, or MlflowException (HTTP 4xx: the
    request's fault, with the server's message) / ServingError (the server's)."""
    with _request(f"{url}/v1/chat/completions", {**body, "stream": False}, timeout) as resp:
        return json.loads(resp.read())


def stream_chat_completions(url: str, body: dict[str, Any], timeout: float = 300.0) -> Iterator[dict[str, Any]]:
    """The chunks (`chat.completion.chunk` dicts) of a streamed Chat Completions request, as they come."""
    with _request(f"{url}/v1/chat/completions", {**body, "stream": True}, timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def served_sha256(url: str, served_name: str) -> str:
    """The sha256 of the adapter behind `served_name`, read from the directory the server says it serves."""
    with _request(f"{url}/v1/models", timeout=30) as resp:
        models = json.loads(resp.read())["data"]
    for entry in models:
        if entry["id"] == served_name:
            found = SHA_DIR.search(entry.get("root") or "")
            if found is None:
                raise ServingError(f"{url} serves {served_name} from {entry.get('root')!r}, not a prepared version")
            return found.group(1)
    raise ServingError(f"{url} does not serve {served_name}; it serves {[m['id'] for m in models]}")
