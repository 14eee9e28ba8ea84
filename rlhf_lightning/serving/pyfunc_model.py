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

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from jinja2.exceptions import TemplateError
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

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
# Prompts per `generate` call: on CPU, batches of 8-16 give most of the throughput; a GPU decodes a
# whole request (at most LIMITS["max_rows"]) at about the cost of one row.
GENERATE_BATCH_SIZE = 8
GPU_GENERATE_BATCH_SIZE = 64
OUTPUT_COLUMNS = ["response", "prompt_tokens", "completion_tokens", "finish_reason", "weights_sha256"]

# One request holds either plain prompts or chat conversations: MLflow's schema check rejects a batch
# that mixes them (a missing `messages` cell is not a list).
MESSAGES_TYPE = Array(Object([Property("role", "string"), Property("content", "string")]))
SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("string", "prompt", required=False),
        ColSpec(MESSAGES_TYPE, "messages", required=False),
    ]),
    outputs=Schema([
        ColSpec("string", "response"),
        ColSpec("long", "prompt_tokens"),
        ColSpec("long", "completion_tokens"),
        ColSpec("string", "finish_reason"),
        ColSpec("string", "weights_sha256"),
    ]),
    # `mlflow models serve` passes request "params" to predict only when the signature declares them.
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
        ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
    ]),
)


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


def conversations(model_input: pd.DataFrame) -> list[list[dict[str, str]]]:
    """One chat (list of {role, content}) per input row, from its `prompt` (a single user turn) or its
    `messages`; raises HTTP-400 errors that name the row and the field."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame([model_input])
    elif isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    model_input = _columns_to_rows(model_input)
    columns = [c for c in ("prompt", "messages") if c in model_input.columns]
    if not columns:
        raise _invalid("input needs a 'prompt' (string) or 'messages' (list of {role, content}) column; none was "
                       "given (columns the signature does not declare are dropped before the model sees them)")
    if len(model_input) > LIMITS["max_rows"]:
        raise _invalid(f"{len(model_input)} rows in one request; send at most {LIMITS['max_rows']} per request")
    chats = []
    for i, row in enumerate(model_input[columns].to_dict("records")):
        prompt, messages = row.get("prompt"), row.get("messages")
        has_prompt, has_messages = not _is_missing(prompt), not _is_missing(messages)
        if has_prompt == has_messages:
            raise _invalid(f"input row {i}: give exactly one of 'prompt' and 'messages'"
                           + (", not both" if has_prompt else ""))
        if has_prompt:
            if not isinstance(prompt, str) or not prompt.strip():
                raise _invalid(f"input row {i}: prompt must be a non-empty string, got {prompt!r}")
            chat = [{"role": "user", "content": prompt}]
        else:
            chat = _check_messages(i, messages)
        chars = sum(len(m["content"]) for m in chat)
        if chars > LIMITS["max_prompt_chars"]:
            raise _invalid(f"input row {i}: the prompt is {chars} characters; this model accepts at most "
                           f"{LIMITS['max_prompt_chars']}; shorten it")
        chats.append(chat)
    return chats


def _columns_to_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The `instances` and `inputs` request forms reach the model as one row whose cells hold whole
    columns (MLflow builds `DataFrame([{column: array}])` because the signature has an array column):
    `prompt` = several strings, `messages` = several chats. Unfold them into one row per request."""
    if len(frame) != 1:
        return frame
    cells = {c: frame.iloc[0][c] for c in ("prompt", "messages") if c in frame.columns}
    prompt, messages = cells.get("prompt"), cells.get("messages")
    if hasattr(prompt, "tolist") and not isinstance(prompt, str):
        prompt = prompt.tolist()
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if isinstance(prompt, list) and "messages" not in cells:
        return pd.DataFrame({"prompt": prompt})
    if isinstance(messages, list) and messages and isinstance(messages[0], (list, tuple)) and "prompt" not in cells:
        return pd.DataFrame({"messages": [list(chat) for chat in messages]})
    return frame


def _check_messages(i: int, messages: Any) -> list[dict[str, str]]:
    if hasattr(messages, "tolist"):  # numpy arrays after schema enforcement
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise _invalid(f"input row {i}: messages must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    chat = []
    for j, m in enumerate(messages):
        where = f"input row {i}: messages[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _invalid(f"{where} must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
        if m["role"] not in LIMITS["roles"]:
            raise _invalid(f"{where}.role must be one of {LIMITS['roles']}, got {m['role']!r}")
        if not m["content"].strip():
            raise _invalid(f"{where}.content is empty")
        chat.append({"role": m["role"], "content": m["content"]})
    if chat[-1]["role"] != "user":
        raise _invalid(f"input row {i}: the last message must be from 'user' (the model answers it), "
                       f"got {chat[-1]['role']!r}")
    return chat


class RLHFPolicyModel(mlflow.pyfunc.PythonModel):
    """Chat generation with a LoRA-tuned causal LM.

    Input: a DataFrame, one request per row, with either ``prompt`` (a string: one user turn) or
    ``messages`` (a list of ``{role, content}``, roles system/user/assistant, ending with a user turn);
    one request holds one kind. The chat template is applied here, with the model's own tokenizer.
    Params: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed`` (same seed and batch →
    same answers), within ``LIMITS``. Output: one row per input row with ``response``, ``prompt_tokens``,
    ``completion_tokens`` (generated tokens up to and including the end token), ``finish_reason``
    (``stop``: the model ended its answer; ``length``: cut at max_new_tokens) and ``weights_sha256``.

    ``model_config``: ``weights_sha256`` (optional), the hash recorded at registration; loading fails
    when the adapter artifact does not match it. ``chat_template`` (optional): the template the policy
    was trained with, used instead of the tokenizer's.
    """

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
        # The scoring server runs each request in a worker thread; one generate at a time keeps CPU
        # threads from oversubscribing and `generate` from sharing state between requests.
        self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        gen = validate_params(params)
        chats = conversations(model_input)
        rows: list[dict[str, Any]] = []
        with self._lock:
            if gen.seed is not None:
                # Seeds the whole request: the same request with the same seed gives the same answers.
                torch.manual_seed(gen.seed)
            for start in range(0, len(chats), self.batch_size):
                rows.extend(self._generate(chats[start : start + self.batch_size], start, gen))
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)

    @torch.no_grad()
    def _generate(self, chats: list[list[dict[str, str]]], first_row: int, gen: GenerationParams) -> list[dict[str, Any]]:
        tok = self.tokenizer
        texts = []
        for i, chat in enumerate(chats):
            try:
                texts.append(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
            except TemplateError as exc:  # the template refuses this conversation: the client's to change
                raise _invalid(f"input row {first_row + i}: the model's chat template refuses roles "
                               f"{[m['role'] for m in chat]}: {exc}") from None
        # The template already contains the special tokens; adding them again would double BOS.
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_tokens = enc["attention_mask"].sum(dim=1)  # (B,)
        for i, n in enumerate(prompt_tokens.tolist()):
            if n + gen.max_new_tokens > self.max_positions:
                raise _invalid(
                    f"input row {first_row + i}: prompt is {n} tokens; with max_new_tokens={gen.max_new_tokens} "
                    f"it exceeds the model's {self.max_positions} positions; shorten the prompt"
                )
        sampling = (
            dict(do_sample=True, temperature=gen.temperature, top_k=0, top_p=gen.top_p)
            if gen.temperature > 0 else dict(do_sample=False)
        )
        out = self.model.generate(
            **enc, max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids,
            **sampling,
        )
        response = out[:, enc["input_ids"].shape[1]:]  # (B, R)
        # Count tokens up to and including the first end token, by position: when pad == eos (SmolLM2)
        # comparing with the pad id would hide real end tokens.
        is_eos = torch.isin(response, torch.tensor(self.stop_ids, device=response.device)).long()  # (B, R)
        keep = (torch.cumsum(is_eos, dim=1) - is_eos) == 0  # (B, R) True up to the first EOS
        ended = is_eos.any(dim=1)  # (B,)
        rows = []
        for i in range(len(chats)):
            ids = response[i][keep[i]]
            words = ids[~is_eos[i][keep[i]].bool()]  # the text stops before the end token, special or not
            rows.append({
                "response": tok.decode(words, skip_special_tokens=True).strip(),
                "prompt_tokens": int(prompt_tokens[i]),
                "completion_tokens": int(ids.numel()),
                "finish_reason": "stop" if bool(ended[i]) else "length",
                "weights_sha256": self.weights_sha256,
            })
        return rows


# Models-from-code: MLflow executes this file at load time and serves the object passed here.
mlflow.models.set_model(RLHFPolicyModel())
