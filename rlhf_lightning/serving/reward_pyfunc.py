"""The registered reward model: an MLflow pyfunc that scores (prompt, response) rows.

Logged as models-from-code, as the policy's pyfunc_model.py and for the same reasons: it imports mlflow,
pandas, torch and transformers, never `rlhf_lightning`. Beside it travels `pair_encoding.py` (MLflow's
`code_paths`), the encoding the reward model was trained and measured with, so a served score is the
score PPO maximised. Artifact `reward_model`: the transformers directory with `reward_stats.json`
(the training pairs' score mean and std, and the maximum length).

Input: rows with `prompt` and `response` text. Output per row: `score` (raw) and `score_normalised`
((score - mean) / std: the scale PPO saw). A bad request is an HTTP 400 that says what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("double", "score_normalised")]),
)
MAX_ROWS = 1024
"""Rows per request."""
BATCH_ROWS = 32
"""Rows per forward pass."""


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400


class RewardModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pair_encoding import PairEncoder  # code_paths: beside this file in the logged model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = Path(context.artifacts["reward_model"])
        stats = json.loads((directory / "reward_stats.json").read_text())
        self.mean, self.std = float(stats["mean"]), float(stats["std"])
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.encoder = PairEncoder(tokenizer, int(stats["max_length"]))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp32, as the scores were measured when it was trained.
        self.model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=torch.float32)
        self.model.to(self.device).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        missing = [c for c in ("prompt", "response") if c not in model_input.columns]
        if missing:
            raise _bad(f"input needs columns 'prompt' and 'response' (missing {missing}): "
                       '{"dataframe_records": [{"prompt": "...", "response": "..."}]}')
        if not 0 < len(model_input) <= MAX_ROWS:
            raise _bad(f"{len(model_input)} rows: send 1 to {MAX_ROWS} per request")
        for column in ("prompt", "response"):
            for i, value in enumerate(model_input[column]):
                if not isinstance(value, str):
                    raise _bad(f"row {i}: {column} must be text, got {type(value).__name__}")
        prompts, responses = list(model_input["prompt"]), list(model_input["response"])
        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), BATCH_ROWS):
                batch = self.encoder(prompts[start : start + BATCH_ROWS], responses[start : start + BATCH_ROWS])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                scores += self.model(**batch).logits.squeeze(-1).float().cpu().tolist()
        return pd.DataFrame({"score": scores, "score_normalised": [(s - self.mean) / self.std for s in scores]})


mlflow.models.set_model(RewardModel())
