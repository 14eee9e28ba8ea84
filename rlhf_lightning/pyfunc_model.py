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
weights, silently (STACK_NOTES).

Artifacts: ``base`` (a transformers ``save_pretrained`` directory with the tokenizer and its chat
template) and ``adapter`` (a peft ``save_pretrained`` directory). The model hashes the adapter weights
file when it loads and returns that hash with every answer, so a client can check which weights are
being served.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""The peft adapter weights file whose sha256 identifies the served policy."""

# Limits the model declares; requests outside them are rejected with HTTP 400.
MAX_NEW_TOKENS_RANGE = (1, 256)
TEMPERATURE_RANGE = (0.0, 2.0)
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 0.0}
# Prompts per `generate` call: on CPU, batches of 8-16 give most of the throughput (STACK_NOTES).
GENERATE_BATCH_SIZE = 8

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([
        ColSpec("string", "response"),
        ColSpec("long", "prompt_tokens"),
        ColSpec("long", "completion_tokens"),
        ColSpec("string", "weights_sha256"),
    ]),
    # `mlflow models serve` passes request "params" to predict only when the signature declares them.
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
    ]),
)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (adapters of large models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE maps to HTTP 400 in the scoring server, with `message` in the body.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validate_params(params: dict[str, Any] | None) -> tuple[int, float]:
    """(max_new_tokens, temperature) from request params, defaults filled in, limits enforced."""
    merged = {**DEFAULT_PARAMS, **(params or {})}
    max_new_tokens, temperature = merged["max_new_tokens"], merged["temperature"]
    lo, hi = MAX_NEW_TOKENS_RANGE
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not lo <= max_new_tokens <= hi:
        raise _invalid(f"params.max_new_tokens must be an integer in [{lo}, {hi}], got {max_new_tokens!r}")
    lo_t, hi_t = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not lo_t <= temperature <= hi_t:
        raise _invalid(
            f"params.temperature must be a number in [{lo_t}, {hi_t}] (0 = greedy), got {temperature!r}"
        )
    return max_new_tokens, float(temperature)


class RLHFPolicyModel(mlflow.pyfunc.PythonModel):
    """Chat generation with a LoRA-tuned causal LM.

    Input: a DataFrame with a string column ``prompt`` (the user message; the chat template is applied
    here with the model's own tokenizer). Params: ``max_new_tokens``, ``temperature`` (0 = greedy).
    Output: one row per prompt with ``response``, ``prompt_tokens``, ``completion_tokens`` (generated
    tokens up to and including the end token) and ``weights_sha256``.

    ``model_config``: ``weights_sha256`` (optional), the hash recorded at registration; loading fails
    when the adapter artifact does not match it.
    """

    def load_context(self, context) -> None:
        # Imported here, not at the top: registry.py imports this module for SIGNATURE and should not
        # pay peft's import time (~7 s) for it.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        base_dir, adapter_dir = context.artifacts["base"], context.artifacts["adapter"]
        self.weights_sha256 = sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE)
        expected = config.get("weights_sha256")
        if expected and expected != self.weights_sha256:
            raise MlflowException(
                f"adapter artifact {adapter_dir}: sha256 {self.weights_sha256} differs from the "
                f"registered {expected}; the model directory is corrupt or was modified after logging"
            )

        tok = AutoTokenizer.from_pretrained(base_dir)
        if tok.chat_template is None:
            raise MlflowException(f"tokenizer in {base_dir} has no chat template; the policy needs one")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # batched generation of decoder models needs left padding
        self.tokenizer = tok

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        # Merging once makes every forward a plain Llama forward (no adapter branches).
        self.model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(self.device).eval()
        self.max_positions = int(self.model.config.max_position_embeddings)
        # The scoring server runs each request in a worker thread; one generate at a time keeps CPU
        # threads from oversubscribing and `generate` from sharing state between requests.
        self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        max_new_tokens, temperature = validate_params(params)
        if "prompt" not in model_input.columns:
            raise _invalid(f"input needs a 'prompt' column, got columns {list(model_input.columns)}")
        prompts = model_input["prompt"].tolist()
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise _invalid(f"input row {i}: prompt must be a non-empty string, got {prompt!r}")

        rows: list[dict[str, Any]] = []
        with self._lock:
            for start in range(0, len(prompts), GENERATE_BATCH_SIZE):
                batch = prompts[start : start + GENERATE_BATCH_SIZE]
                rows.extend(self._generate(batch, start, max_new_tokens, temperature))
        return pd.DataFrame(rows, columns=["response", "prompt_tokens", "completion_tokens", "weights_sha256"])

    @torch.no_grad()
    def _generate(self, prompts: list[str], first_row: int, max_new_tokens: int,
                  temperature: float) -> list[dict[str, Any]]:
        tok = self.tokenizer
        chats = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # The template already contains the special tokens; adding them again would double BOS.
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_tokens = enc["attention_mask"].sum(dim=1)  # (B,)
        for i, n in enumerate(prompt_tokens.tolist()):
            if n + max_new_tokens > self.max_positions:
                raise _invalid(
                    f"input row {first_row + i}: prompt is {n} tokens; with max_new_tokens={max_new_tokens} "
                    f"it exceeds the model's {self.max_positions} positions; shorten the prompt"
                )
        sampling = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0 else dict(do_sample=False)
        )
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            **sampling,
        )
        response = out[:, enc["input_ids"].shape[1]:]  # (B, R)
        # Count tokens up to and including the first end token, by position: when pad == eos (SmolLM2)
        # comparing with the pad id would hide real end tokens (STACK_NOTES).
        is_eos = (response == tok.eos_token_id).long()  # (B, R)
        keep = (torch.cumsum(is_eos, dim=1) - is_eos) == 0  # (B, R) True up to the first EOS
        rows = []
        for i in range(len(prompts)):
            ids = response[i][keep[i]]
            rows.append({
                "response": tok.decode(ids, skip_special_tokens=True).strip(),
                "prompt_tokens": int(prompt_tokens[i]),
                "completion_tokens": int(ids.numel()),
                "weights_sha256": self.weights_sha256,
            })
        return rows


# Models-from-code: MLflow executes this file at load time and serves the object passed here.
mlflow.models.set_model(RLHFPolicyModel())
