"""The served policy: an MLflow pyfunc model that loads base weights + LoRA adapter and generates.

This file is logged as *models-from-code* (``mlflow.pyfunc.log_model(python_model=<this file>)``):
MLflow copies it into the model directory and executes it at load time. Why this form:

- MLflow 3.17 refuses to unpickle a pickled ``PythonModel`` unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``
  is set, so a cloudpickled instance would not load under ``mlflow models serve`` by default;
- a pickled instance of a class living in ``rlhf_lightning`` would be pickled *by reference* and need the
  training package importable wherever the model is served.

So this module is self-contained: it imports only mlflow, pandas, torch, transformers and peft — never
``rlhf_lightning`` — and the served model does not depend on the training code or its private state.
It does not use the ``mlflow.transformers`` flavour either: on a PEFT model it reloads with random
weights, silently.

Artifacts: ``adapter`` (a peft ``save_pretrained`` directory), ``tokenizer`` (the policy's tokenizer)
and either ``base_ref`` (a small JSON file naming a base model stored once outside the version — a
logged artifact every version on that base shares, or a hub id and commit — with the sha256 of each of
its files) or ``base`` (a full ``save_pretrained`` directory, as versions registered before
``base_ref`` existed, and ``registry.base_store: copy``, have it). A referenced base is downloaded once
per machine into ``RLHF_BASE_CACHE`` and every file is checked against its recorded sha256 on each
load. The model hashes the adapter weights file when it loads and returns that hash with every answer,
so a client can check which weights are being served.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from jinja2.exceptions import TemplateError
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""The peft adapter weights file whose sha256 identifies the served policy."""

LIMITS: dict[str, Any] = {
    "max_new_tokens": [1, 256],
    "temperature": [0.0, 2.0],     # 0 = greedy
    "top_p": [0.0, 1.0],           # nucleus sampling mass, 0 excluded
    "seed": [0, 2**31 - 1],
    "max_rows": 64,                # rows per request: a bigger batch holds the generation lock too long
    "max_prompt_chars": 32768,     # per row, all messages together: checked before tokenizing
    "roles": ["system", "user", "assistant"],
}
"""What the model accepts; a request outside these limits gets HTTP 400 saying which limit. Recorded in
the MLmodel metadata (`limits`) so clients can read them without calling the model."""
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": None}
# Rows per `generate` call when one request is served alone (RLHF_SERVE_BATCHING=0, the behaviour before
# requests were batched together): on CPU, batches of 8-16 give most of a lone request's throughput; a GPU
# decodes a whole request (at most LIMITS["max_rows"]) at about the cost of one row.
GENERATE_BATCH_SIZE = 8
GPU_GENERATE_BATCH_SIZE = 64
BATCHING_ENV = "RLHF_SERVE_BATCHING"
"""`0` serves one request per `generate` (as before batching); anything else, or unset, batches."""
BATCH_ROWS_ENV = "RLHF_SERVE_BATCH_ROWS"
"""Rows of concurrent requests one `generate` may hold (default LIMITS["max_rows"])."""
BATCH_WAIT_ENV = "RLHF_SERVE_BATCH_WAIT_MS"
"""How long the first request of a batch waits for others (default 5 ms). Requests that arrive while a
`generate` runs queue anyway and go together into the next one."""
REQUEST_THREADS = 128
"""Requests the scoring server hands to the model at once (see `_widen_request_threads`)."""
OUTPUT_COLUMNS = ["response", "prompt_tokens", "completion_tokens", "finish_reason", "weights_sha256"]

# No input schema, on purpose: with a column schema MLflow drops whatever has no declared column name
# before the model sees it, so a plain list of prompts (`{"inputs": ["..."]}`, `predict(["..."])`)
# arrived as an empty frame, and a Chat Completions body lost its own keys (max_tokens, n, stream).
# `conversations` / `chat_request` check every form as strictly as the schema did (HTTP 400 naming the
# row and the field). Params stay declared: the scoring server passes only declared params to predict.
SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([
        ColSpec("string", "response"),
        ColSpec("long", "prompt_tokens"),
        ColSpec("long", "completion_tokens"),
        ColSpec("string", "finish_reason"),
        ColSpec("string", "weights_sha256"),
    ]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
        ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
    ]),
)

# The Chat Completions request keys this model reads; `temperature`, `top_p` and `seed` are declared
# params, so the scoring server hands them over as params, the others in the body.
CHAT_KEYS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
             "stream", "stream_options", "user", "stop", "frequency_penalty", "presence_penalty", "logprobs"}
# Keys clients send with a neutral value (the openai package leaves them out unless set; LangChain sends
# some as null or 0): accepted with that value, refused with another, since this model cannot honour it.
NEUTRAL = {"stop": (None, [], ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
           "logprobs": (None, False), "stream_options": (None,), "user": None}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (adapters of large models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


BASE_CACHE_ENV = "RLHF_BASE_CACHE"
"""Where a referenced base model is kept once downloaded (default ~/.cache/rlhf-lightning/bases)."""


def _skipped(rel: Path) -> bool:
    # Hidden entries are tooling state (huggingface_hub's `.cache` in a local_dir, `.git`), not the model.
    return any(part.startswith(".") for part in rel.parts)


def base_manifest(base_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a base model directory (hidden entries aside)."""
    root = Path(base_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _skipped(p.relative_to(root)))
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 for a whole base: the identity a stored base is found by."""
    text = "".join(f"{name}\t{sha}\n" for name, sha in sorted(manifest.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def check_base(base_dir: str | Path, manifest: dict[str, str], source: str, exact: bool = True) -> None:
    """Raise, naming the files, unless `base_dir` holds the files of `manifest` with their sha256 (and,
    if `exact`, no others)."""
    have = base_manifest(base_dir)
    missing = sorted(set(manifest) - set(have))
    extra = sorted(set(have) - set(manifest)) if exact else []
    changed = sorted(n for n in set(manifest) & set(have) if manifest[n] != have[n])
    if missing or extra or changed:
        parts = [f"{label}: {names[:5]}" for label, names in
                 (("missing", missing), ("differ", changed), ("not registered", extra)) if names]
        raise MlflowException(f"base model from {source} does not match the files registered with this version "
                              f"({'; '.join(parts)}): it was modified after registration, or the download is "
                              f"corrupt; the registered sha256 of each file is in the version's base_ref artifact")


def base_cache_dir() -> Path:
    return Path(os.environ.get(BASE_CACHE_ENV) or Path.home() / ".cache" / "rlhf-lightning" / "bases")


def fetch_base(ref: dict[str, Any]) -> str:
    """The local directory of the base that `ref` (a version's base_ref) names. A logged base: from the
    cache when it is there and intact, else downloaded, checked file by file against the recorded
    sha256, and moved into the cache in one rename (a concurrent loader never sees half a copy)."""
    files, digest = ref["files"], ref["digest"]
    if manifest_digest(files) != digest:
        raise MlflowException(f"base_ref: the file list does not hash to its digest {digest}; the artifact was edited")
    if not ref.get("uri"):
        # A hub base stays in the hub cache (no second copy of its weights): the snapshot of that commit,
        # downloaded if missing, with every registered file checked. Files fetched beside them for other
        # uses of the same snapshot may be there too.
        from huggingface_hub import snapshot_download

        local = snapshot_download(ref["hub_id"], revision=ref["revision"], allow_patterns=sorted(files))
        check_base(local, files, f"hub {ref['hub_id']}@{ref['revision']}", exact=False)
        return local
    cached = base_cache_dir() / digest
    if cached.is_dir():
        try:
            check_base(cached, files, str(cached))
            return str(cached)
        except MlflowException:
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cached copy: fetch it again
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=cached.parent))
    try:
        source = ref["uri"]
        (tmp / "dl").mkdir()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp / "dl")))
        check_base(local, files, source)
        try:
            os.replace(local, cached)
        except OSError:
            if not cached.is_dir():  # another loader's rename won the race: theirs is the same files
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE maps to HTTP 400 in the scoring server, with `message` in the body.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def validate_params(params: dict[str, Any] | None) -> GenerationParams:
    """Request params with defaults filled in and `LIMITS` enforced (HTTP 400 naming the limit)."""
    # Params the signature does not declare never get here: MLflow drops them (with a warning) first.
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    n, t, p, seed = merged["max_new_tokens"], merged["temperature"], merged["top_p"], merged["seed"]
    lo, hi = LIMITS["max_new_tokens"]
    if not _is_int(n) or not lo <= n <= hi:
        raise _invalid(f"params.max_new_tokens must be an integer in [{lo}, {hi}], got {n!r}")
    lo, hi = LIMITS["temperature"]
    if not _is_number(t) or not lo <= t <= hi:
        raise _invalid(f"params.temperature must be a number in [{lo}, {hi}] (0 = greedy), got {t!r}")
    lo, hi = LIMITS["top_p"]
    if not _is_number(p) or not lo < p <= hi:
        raise _invalid(f"params.top_p must be a number in ({lo}, {hi}] (1 = no nucleus cut), got {p!r}")
    lo, hi = LIMITS["seed"]
    if seed is not None and (not _is_int(seed) or not lo <= seed <= hi):
        raise _invalid(f"params.seed must be an integer in [{lo}, {hi}], got {seed!r}")
    return GenerationParams(n, float(t), float(p), seed)


def _is_missing(value: Any) -> bool:
    # A column absent from a row arrives as NaN/None in the DataFrame.
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    # numpy arrays (JSON lists after MLflow's parsing) and numpy scalars as Python lists and values.
    if hasattr(value, "tolist") and not isinstance(value, str):
        return value.tolist()
    return value


def is_chat_request(model_input: Any) -> bool:
    """A Chat Completions body: a dict whose `messages` is one conversation (a list of message dicts),
    as `{"messages": [...], "max_tokens": 16}` posted to /invocations or passed to `predict`. The
    columnar `{"messages": [chat, chat]}` form holds a list of conversations instead."""
    if not isinstance(model_input, dict):
        return False
    messages = _plain(model_input.get("messages"))
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) for m in messages)


def conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """One chat (list of {role, content}) per request row; raises HTTP-400 errors that name the row and
    the field. Rows come as a DataFrame or a list of dicts with `prompt` (a single user turn) or
    `messages`, as a dict of columns (`{"prompt": [...]}`), as plain prompt strings (a list, or one) or
    as a list of chats."""
    model_input = _plain(model_input)
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, dict):
        columns = {k: _plain(v) for k, v in model_input.items()}
        if any(isinstance(v, list) for v in columns.values()):  # columnar: {"prompt": ["a", "b"]}
            lengths = {len(v) for v in columns.values() if isinstance(v, list)}
            if len(lengths) > 1 or not all(isinstance(v, list) for v in columns.values()):
                raise _invalid(f"columns {sorted(columns)} hold different numbers of rows; give one value per row")
            model_input = pd.DataFrame(columns)
        else:
            model_input = pd.DataFrame([columns])
    elif isinstance(model_input, list):
        rows = []
        for x in model_input:  # prompt strings, chats and request rows, each item one request row
            x = _plain(x)
            if isinstance(x, str):
                rows.append({"prompt": x})
            elif isinstance(x, dict):
                rows.append(x)
            elif isinstance(x, list) and x and all(isinstance(m, dict) for m in x):
                rows.append({"messages": x})
            else:
                raise _invalid(f"input row {len(rows)}: a list input must hold prompt strings, chats (lists of "
                               f"{{role, content}}) or request rows ({{prompt}} or {{messages}}), got {x!r:.80}")
        model_input = pd.DataFrame(rows)
    if not isinstance(model_input, pd.DataFrame):
        raise _invalid(f"input must be prompt strings, request rows or a Chat Completions body, got "
                       f"{type(model_input).__name__}")
    if len(model_input) == 0:
        raise _invalid("the request holds no rows; send at least one prompt")
    columns = [c for c in ("prompt", "messages") if c in model_input.columns]
    if not columns:
        raise _invalid(f"input needs a 'prompt' (string) or 'messages' (list of {{role, content}}) column, or a "
                       f"plain list of prompt strings; got columns {[str(c) for c in model_input.columns][:8]}")
    if len(model_input) > LIMITS["max_rows"]:
        raise _invalid(f"{len(model_input)} rows in one request; send at most {LIMITS['max_rows']} per request")
    chats = []
    for i, row in enumerate(model_input[columns].to_dict("records")):
        prompt, messages = row.get("prompt"), _plain(row.get("messages"))
        has_prompt, has_messages = not _is_missing(prompt), not _is_missing(messages)
        if has_prompt == has_messages:
            raise _invalid(f"input row {i}: give exactly one of 'prompt' and 'messages'"
                           + (", not both" if has_prompt else ""))
        if has_prompt:
            if not isinstance(prompt, str) or not prompt.strip():
                raise _invalid(f"input row {i}: prompt must be a non-empty string, got {prompt!r:.80}")
            chat = [{"role": "user", "content": prompt}]
        else:
            chat = _check_messages(f"input row {i}: ", messages)
        _check_length(f"input row {i}: ", chat)
        chats.append(chat)
    return chats


def _check_length(where: str, chat: list[dict[str, str]]) -> None:
    chars = sum(len(m["content"]) for m in chat)
    if chars > LIMITS["max_prompt_chars"]:
        raise _invalid(f"{where}the prompt is {chars} characters; this model accepts at most "
                       f"{LIMITS['max_prompt_chars']}; shorten it")


def _content_text(where: str, content: Any) -> str:
    """A message's content: a string, or OpenAI's list of content parts of which only text parts are
    understood here."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise _invalid(f"{where}.content has {kinds} parts; this model reads text parts only")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise _invalid(f"{where}.content: every text part needs a string 'text'")
        return "".join(p["text"] for p in content)
    raise _invalid(f"{where} must be {{\"role\": str, \"content\": str}}, got content {content!r:.80}")


def _check_messages(where: str, messages: Any) -> list[dict[str, str]]:
    messages = _plain(messages)
    if not isinstance(messages, list) or not messages:
        raise _invalid(f"{where}messages must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    chat = []
    for j, m in enumerate(messages):
        at = f"{where}messages[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise _invalid(f"{at} must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
        # OpenAI's newer name for the system turn.
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in LIMITS["roles"]:
            raise _invalid(f"{at}.role must be one of {LIMITS['roles']} (or 'developer'), got {m['role']!r}")
        content = _content_text(at, m["content"])
        if not content.strip():
            raise _invalid(f"{at}.content is empty")
        chat.append({"role": role, "content": content})
    if chat[-1]["role"] != "user":
        raise _invalid(f"{where}the last message must be from 'user' (the model answers it), "
                       f"got {chat[-1]['role']!r}")
    return chat


@dataclass(frozen=True)
class ChatRequest:
    """A Chat Completions request as this model serves it: `n` answers to one conversation."""

    chat: list[dict[str, str]]
    gen: GenerationParams
    n: int
    model: str | None


def chat_request(body: dict[str, Any], params: dict[str, Any] | None) -> ChatRequest:
    """Check a Chat Completions body (`is_chat_request`) and read its generation settings: `max_tokens`
    (or `max_completion_tokens`) is max_new_tokens; `temperature`, `top_p` and `seed` come as params when
    posted (declared params), or in the body when passed to `predict`. HTTP 400 for what it cannot honour."""
    body = {k: _plain(v) for k, v in body.items()}
    unknown = sorted(set(body) - CHAT_KEYS)
    if unknown:
        raise _invalid(f"Chat Completions field(s) {unknown} are not supported by this model; it reads "
                       f"{sorted(CHAT_KEYS - set(NEUTRAL))}")
    for key, neutral in NEUTRAL.items():
        if neutral is not None and key in body and body[key] not in neutral:
            raise _invalid(f"{key}={body[key]!r} is not supported by this model (leave it out); the rlhf-vllm "
                           f"deployment target serves the full Chat Completions API")
    if body.get("stream"):
        raise _invalid("stream=true: `mlflow models serve` answers whole responses only (MLflow issue #12439); "
                       "stream from the rlhf-vllm deployment target (vLLM's OpenAI server)")
    merged = dict(params or {})
    merged.update({k: body[k] for k in ("temperature", "top_p", "seed") if body.get(k) is not None})
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            merged["max_new_tokens"] = body[key]
            break
    try:
        gen = validate_params(merged)
    except MlflowException as exc:  # name the field as the client sent it
        raise _invalid(exc.message.replace("params.max_new_tokens", "max_tokens")) from None
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= LIMITS["max_rows"]:
        raise _invalid(f"n must be an integer in [1, {LIMITS['max_rows']}], got {n!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid(f"model must be a string, got {model!r:.80}")
    chat = _check_messages("", body["messages"])
    _check_length("", chat)
    return ChatRequest(chat=chat, gen=gen, n=n, model=model)


def chat_completion(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The Chat Completions response for `rows`, the answers to one request's `n` copies of its chat,
    with the served weights' sha256 beside the standard fields (clients ignore fields they do not know)."""
    prompt_tokens = rows[0]["prompt_tokens"]
    completion = sum(r["completion_tokens"] for r in rows)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r["response"]},
                     "finish_reason": r["finish_reason"], "logprobs": None} for i, r in enumerate(rows)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
        "weights_sha256": rows[0]["weights_sha256"],
    }


def row_seed(seed: int | None, row: int) -> int | None:
    """The seed of row `row` of a request seeded `seed`: distinct for every (seed, row) pair, since a
    request holds at most LIMITS["max_rows"] rows, and independent of the requests it is batched with."""
    return None if seed is None else seed * LIMITS["max_rows"] + row


class RowSampling:
    """A logits processor that samples each row with its own temperature, top-p and random generator,
    and leaves greedy rows (temperature 0) as they are; `generate` then runs greedily and takes the token
    chosen here. Rows of different requests share a batch, so sampling cannot use one global RNG: a
    seeded request must get the same answers whatever it was batched with."""

    def __init__(self, temperature: list[float], top_p: list[float], generators: list[torch.Generator | None]):
        self.rows = [i for i, t in enumerate(temperature) if t > 0]
        self.temperature = torch.tensor([temperature[i] for i in self.rows], dtype=torch.float32)
        self.top_p = torch.tensor([top_p[i] for i in self.rows], dtype=torch.float32)
        self.generators = [generators[i] for i in self.rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return scores
        idx = torch.tensor(self.rows, device=scores.device)
        logits = scores[idx].float() / self.temperature.to(scores.device)[:, None]  # (S, V)
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)  # (S, V)
        # Nucleus: keep the smallest prefix of the sorted tokens whose mass reaches top_p (always the first).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= self.top_p.to(scores.device)[:, None], 0.0)
        cdf = probs.cumsum(dim=-1)  # (S, V)
        # One uniform draw per row from its own generator: inverse-CDF sampling over the kept tokens.
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(scores.device)  # (S,)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)  # (S, 1)
        token = order.gather(1, pick).squeeze(1)  # (S,)
        out = scores.clone()
        out[idx] = float("-inf")
        out[idx, token] = 0.0
        return out


@dataclass
class _Job:
    """One request's rows waiting for the batcher."""

    ids: list[list[int]]
    gen: GenerationParams
    seeds: list[int | None]
    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any] | None] = field(default_factory=list)
    left: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.results = [None] * len(self.ids)
        self.left = len(self.ids)


class RowLimits:
    """A stopping criterion: each row of a batch is done at its own request's max_new_tokens, so `generate`
    ends once every row has ended its answer or reached its own limit (not the longest row's)."""

    def __init__(self, prompt_width: int, limits: list[int]):
        self.prompt_width = prompt_width
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits.to(input_ids.device)


def _batch_forever(ref: weakref.ref, jobs: queue.Queue) -> None:
    """The batcher thread: answer queued requests batch by batch while the model lives (see
    RLHFPolicyModel._ensure_batcher); a None in the queue means it is gone."""
    pending: collections.deque = collections.deque()
    while True:
        if not pending:
            job = jobs.get()
            if job is None:
                return
            pending.extend((job, i) for i in range(len(job.ids)))
        model = ref()
        if model is None:
            return
        model._next_batch(pending)
        del model  # hold the model only while answering


SCORING_SERVER_ENV = "__pyfunc_model_path__"
"""Set in the process `mlflow models serve` starts to load and serve the model (its app module reads it)."""


def _widen_request_threads(timeout: float = 120.0) -> None:
    """Let the scoring server hand the model as many concurrent requests as one batch can hold.

    `mlflow models serve` runs each request with `asyncio.to_thread`, i.e. in the event loop's default
    executor: min(32, cores + 4) threads, 6 on a 2-core machine, so no more than 6 requests could ever
    wait for the same `generate` (measured: batches of 1-6 rows under 64 clients). uvicorn loads the
    model before it starts its loop, so a thread waits for the loop to run (found among the live
    objects: there is no other way to reach another thread's loop) and gives it a wider executor; the
    threads only wait on the batcher. Only in the scoring server's process."""
    if SCORING_SERVER_ENV not in os.environ:
        return

    def widen() -> None:
        import gc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
            if loops:
                wide = ThreadPoolExecutor(max_workers=REQUEST_THREADS, thread_name_prefix="invocations")
                loops[0].call_soon_threadsafe(loops[0].set_default_executor, wide)
                return
            time.sleep(0.2)

    threading.Thread(target=widen, name="rlhf-widen-executor", daemon=True).start()


class RLHFPolicyModel(mlflow.pyfunc.PythonModel):
    """Chat generation with a LoRA-tuned causal LM.

    Input, in one of three forms:

    - request rows: a DataFrame or list of dicts, one request per row, with either ``prompt`` (a string:
      one user turn) or ``messages`` (a list of ``{role, content}``, roles system/user/assistant, ending
      with a user turn); params ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``
      (same request and seed → same answers), within ``LIMITS``. Output: one row per input row with
      ``response``, ``prompt_tokens``, ``completion_tokens`` (generated tokens up to and including the
      end token), ``finish_reason`` (``stop``: the model ended its answer; ``length``: cut at
      max_new_tokens) and ``weights_sha256``;
    - plain prompt strings (``["...", "..."]``, ``{"inputs": [...]}`` over REST): rows of prompts;
    - a Chat Completions body (``{"messages": [...], "max_tokens", "temperature", "top_p", "seed", "n"}``,
      posted as it is to /invocations): answered with a Chat Completions response (``choices``,
      ``usage``; ``weights_sha256`` beside them).

    The chat template is applied here, with the model's own tokenizer. Concurrent requests share
    `generate` calls (see `_next_batch`): each keeps its own params, and a seeded row samples from its own
    generator, so its answer does not depend on what it was batched with.

    ``model_config``: ``weights_sha256`` (optional), the hash recorded at registration; loading fails
    when the adapter artifact does not match it. ``chat_template`` (optional): the template the policy
    was trained with, used instead of the tokenizer's. ``model_name`` (optional): the name Chat
    Completions responses carry when the request names none.
    """

    # `predict` takes its input untyped on purpose (see SIGNATURE): no type-hint validation wrapper, and
    # no warning at every import advising type hints (MLflow's own chat models skip it the same way).
    _skip_type_hint_validation = True

    @staticmethod
    def base_dir(artifacts: dict[str, str]) -> str:
        """The base model's local directory: inside the version (`base`), or the one `base_ref` names."""
        if "base" in artifacts:
            return artifacts["base"]
        return fetch_base(json.loads(Path(artifacts["base_ref"]).read_text()))

    def load_context(self, context) -> None:
        # Imported here, not at the top: registry.py imports this module for SIGNATURE and should not
        # pay peft's import time (~7 s) for it.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        adapter_dir = context.artifacts["adapter"]
        self.weights_sha256 = sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE)
        expected = config.get("weights_sha256")
        if expected and expected != self.weights_sha256:
            raise MlflowException(
                f"adapter artifact {adapter_dir}: sha256 {self.weights_sha256} differs from the "
                f"registered {expected}; the model directory is corrupt or was modified after logging"
            )

        base_dir = self.base_dir(context.artifacts)
        tok = AutoTokenizer.from_pretrained(context.artifacts.get("tokenizer") or base_dir)
        # The template the policy was trained with, as the registry recorded it (the user's, the
        # tokenizer's, or a plain one; system messages folded where the tokenizer's refuses them).
        # Versions registered before it was recorded use the tokenizer's own.
        if config.get("chat_template"):
            tok.chat_template = config["chat_template"]
        if tok.chat_template is None:
            raise MlflowException(f"tokenizer in {base_dir} has no chat template; the policy needs one")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # batched generation of decoder models needs left padding
        self.tokenizer = tok

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Half precision on a GPU (bf16 where it is native, compute capability 8.0+; fp16 before): a 7B
        # policy serves in 14 GB instead of 28, as the training steps hold their frozen base; fp32 on a CPU.
        dtype, self.batch_size = torch.float32, GENERATE_BATCH_SIZE
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
            self.batch_size = GPU_GENERATE_BATCH_SIZE
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        # Merging once makes every forward a plain Llama forward (no adapter branches).
        self.model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(self.device).eval()
        self.max_positions = int(self.model.config.max_position_embeddings)
        # The tokens that end a turn: the model's generation config may list several (Gemma's
        # <end_of_turn>, Llama 3's <|eot_id|>) beside the tokenizer's eos. models.loading.stop_token_ids
        # reads the same; this module loads nothing of training, so it reads them itself.
        listed = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        self.stop_ids = sorted(set([listed] if isinstance(listed, int) else listed or []) | {tok.eos_token_id})
        self.model_name = config.get("model_name") or "rlhf-policy"
        # Fast tokenizers are not safe to call from several request threads at once ("Already borrowed").
        self._tok_lock = threading.Lock()
        self.batching = os.environ.get(BATCHING_ENV, "1") != "0"
        self.batch_rows = int(os.environ.get(BATCH_ROWS_ENV) or LIMITS["max_rows"])
        self.batch_wait = float(os.environ.get(BATCH_WAIT_ENV) or 5) / 1000
        if self.batch_rows < 1:
            raise MlflowException(f"{BATCH_ROWS_ENV}={self.batch_rows}: give at least 1 row per generate")
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._batcher_pid: int | None = None  # the process whose batcher thread serves _queue
        self._start_lock = threading.Lock()
        _widen_request_threads()

    def _ensure_batcher(self) -> None:
        """Start the batcher thread on the first request (and again in a process forked after that).

        One generate at a time, on one thread: CPU threads do not oversubscribe and `generate` shares no
        state between calls; the request threads queue their rows and wait. The thread holds the model
        only while it answers a batch (a weak reference otherwise), and exits when the model is freed:
        a model loaded once (MLflow's input-example check at registration) is not pinned in memory."""
        if self._batcher_pid == os.getpid():
            return
        with self._start_lock:
            if self._batcher_pid == os.getpid():
                return
            self._queue = queue.Queue()
            threading.Thread(target=_batch_forever, args=(weakref.ref(self), self._queue), name="rlhf-batcher",
                             daemon=True).start()
            weakref.finalize(self, self._queue.put, None)  # wakes the thread to exit
            self._batcher_pid = os.getpid()

    # ------------------------------------------------------------------ requests

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        # No type hints on model_input: MLflow would try to build a schema from them.
        if is_chat_request(model_input):
            req = chat_request(model_input, params)
            rows = self._answer([req.chat] * req.n, req.gen, list(range(req.n)))
            return chat_completion(rows, req.model or self.model_name)
        gen = validate_params(params)
        chats = conversations(model_input)
        return pd.DataFrame(self._answer(chats, gen, list(range(len(chats)))), columns=OUTPUT_COLUMNS)

    def _answer(self, chats: list[list[dict[str, str]]], gen: GenerationParams, rows: list[int]) -> list[dict[str, Any]]:
        """Tokenize `chats` here (errors are this request's 400s), queue them, wait for their answers."""
        job = _Job(ids=self._encode(chats, gen), gen=gen, seeds=[row_seed(gen.seed, r) for r in rows])
        self._ensure_batcher()
        self._queue.put(job)
        job.done.wait()
        if isinstance(job.error, MlflowException):
            raise job.error
        if job.error is not None:  # the server's failure, not the request's: HTTP 500, not 400
            raise MlflowException(f"generation failed: {job.error!r}", error_code=INTERNAL_ERROR) from job.error
        return job.results

    def _encode(self, chats: list[list[dict[str, str]]], gen: GenerationParams) -> list[list[int]]:
        ids = []
        with self._tok_lock:
            for i, chat in enumerate(chats):
                try:
                    text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                except TemplateError as exc:  # the template refuses this conversation: the client's to change
                    raise _invalid(f"input row {i}: the model's chat template refuses roles "
                                   f"{[m['role'] for m in chat]}: {exc}") from None
                # The template already contains the special tokens; adding them again would double BOS.
                ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for i, row in enumerate(ids):
            if len(row) + gen.max_new_tokens > self.max_positions:
                raise _invalid(f"input row {i}: prompt is {len(row)} tokens; with max_new_tokens={gen.max_new_tokens} "
                               f"it exceeds the model's {self.max_positions} positions; shorten the prompt")
        return ids

    # ------------------------------------------------------------------ the batcher

    def _next_batch(self, pending: collections.deque) -> None:
        """Answer one batch from `pending` (rows in arrival order, a request's rows possibly split over
        two batches), after taking what has queued meanwhile: at most `batch_rows` rows, waiting
        `batch_wait` for more after the first, and no more than fit the model's positions when every row
        runs to the longest max_new_tokens among them. With batching off, one request's rows at a time,
        `batch_size` a call."""
        limit = self.batch_rows if self.batching else self.batch_size
        if self.batching:
            deadline = time.monotonic() + self.batch_wait
            while len(pending) < limit:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:  # cannot happen while this holds the model; keep the sentinel for the loop
                    self._queue.put(None)
                    break
                pending.extend((job, i) for i in range(len(job.ids)))
        first_job = pending[0][0]
        batch, longest, most = [], 0, 0
        while pending and len(batch) < limit and (self.batching or pending[0][0] is first_job):
            job, i = pending[0]
            width, steps = max(longest, len(job.ids[i])), max(most, job.gen.max_new_tokens)
            if batch and width + steps > self.max_positions:
                break  # this row waits for the next batch (alone it fits: _encode checked it)
            batch.append(pending.popleft())
            longest, most = width, steps
        try:
            answers = self._generate(batch)
        except BaseException as exc:  # a bug or the device failing: every request of the batch fails with it
            failed = {id(j): j for j, _ in batch}
            for job in failed.values():
                job.error = exc
                job.done.set()
            kept = [(j, i) for j, i in pending if id(j) not in failed]
            pending.clear()
            pending.extend(kept)
            return
        for (job, i), answer in zip(batch, answers):
            job.results[i] = answer
            job.left -= 1
            if job.left == 0:
                job.done.set()

    @torch.no_grad()
    def _generate(self, batch: list[tuple[_Job, int]]) -> list[dict[str, Any]]:
        """Answer each (request, row) of `batch` with one `generate`: to the longest max_new_tokens among
        them, each row then cut at its own."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        with self._tok_lock:
            enc = tok.pad({"input_ids": [job.ids[i] for job, i in batch]}, padding=True, return_tensors="pt")
        enc = enc.to(self.device)
        prompt_tokens = enc["attention_mask"].sum(dim=1)  # (B,)
        limits = [job.gen.max_new_tokens for job, _ in batch]
        generators = []
        for job, i in batch:
            seed = job.seeds[i]
            if job.gen.temperature > 0:
                g = torch.Generator()
                g.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
                generators.append(g)
            else:
                generators.append(None)
        sampler = RowSampling([job.gen.temperature for job, _ in batch], [job.gen.top_p for job, _ in batch], generators)
        stop = RowLimits(enc["input_ids"].shape[1], limits)
        out = self.model.generate(
            **enc, max_new_tokens=max(limits), pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids,
            do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        response = out[:, enc["input_ids"].shape[1]:]  # (B, R)
        # Count tokens up to and including the first end token, by position: when pad == eos (SmolLM2)
        # comparing with the pad id would hide real end tokens.
        is_eos = torch.isin(response, torch.tensor(self.stop_ids, device=response.device)).long()  # (B, R)
        keep = (torch.cumsum(is_eos, dim=1) - is_eos) == 0  # (B, R) True up to the first EOS
        rows = []
        for b, limit in enumerate(limits):
            ids = response[b][keep[b]][:limit]
            ended = bool(is_eos[b][keep[b]][:limit].any())
            words = ids[:-1] if ended else ids  # the text stops before the end token, special or not
            with self._tok_lock:
                text = tok.decode(words, skip_special_tokens=True).strip()
            rows.append({
                "response": text,
                "prompt_tokens": int(prompt_tokens[b]),
                "completion_tokens": int(ids.numel()),
                "finish_reason": "stop" if ended else "length",
                "weights_sha256": self.weights_sha256,
            })
        return rows


# Models-from-code: MLflow executes this file at load time and serves the object passed here.
mlflow.models.set_model(RLHFPolicyModel())
