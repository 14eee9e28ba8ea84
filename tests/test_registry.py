"""Registry: the logged pyfunc model reloads with the trained weights, versions carry tags and aliases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from rlhf_lightning import registry
from rlhf_lightning.config import from_dict
from rlhf_lightning.models import generation, loading

PROMPTS = ["Write a one-sentence review of a small seaside cafe.", "Describe a rainy day.", "Hi"]
MODEL_NAME = "rlhf-policy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registered(mlflow_tracking, tiny_policy):
    """Version 1 (candidate only, logged into the active run), then version 2 (promoted, logged by
    resuming a finished run) — the two ways the flow calls it."""
    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama"}})
    with mlflow.start_run() as run:
        v1 = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, promote=False,
                                       tags={"metaflow_run": "RlhfFlow/1", "gold_win_rate": "0.4"})
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    v2 = registry.log_and_register(cfg, adapter_dir, base_dir, run_id, promote=True,
                                   tags={"metaflow_run": "RlhfFlow/2"})
    return v1, v2, run_id


@pytest.fixture(scope="module")
def candidate(registered):
    """The candidate version loaded through the registry, as `mlflow models serve` loads it."""
    return mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")


def test_weights_sha256_is_the_adapter_file_hash(tiny_policy, tmp_path):
    _, adapter_dir, _ = tiny_policy
    with open(f"{adapter_dir}/adapter_model.safetensors", "rb") as fh:
        assert registry.weights_sha256(adapter_dir) == hashlib.sha256(fh.read()).hexdigest()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        registry.weights_sha256(tmp_path)


def test_versions_have_aliases_tags_and_lineage(registered):
    v1, v2, run_id = registered
    assert (v1.name, v1.version, v2.version) == (MODEL_NAME, "1", "2")
    assert v1.aliases == ["candidate"]
    assert v2.aliases == ["candidate", "champion"]
    assert v2.model_uri == f"models:/{MODEL_NAME}/2"
    assert v1.weights_sha256 == v2.weights_sha256

    client = MlflowClient()
    # `candidate` moved to the newest version; v1 keeps its tags but no alias.
    assert str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    assert client.get_model_version(MODEL_NAME, "1").aliases == []
    mv = client.get_model_version(MODEL_NAME, "2")
    assert mv.run_id == run_id
    assert mv.tags == {"metaflow_run": "RlhfFlow/2", "weights_sha256": v2.weights_sha256,
                       "base_model": "tiny:llama", "quantization": "none"}
    assert v2.weights_sha256 in mv.description
    assert client.get_model_version(MODEL_NAME, "1").tags["gold_win_rate"] == "0.4"


def test_logged_model_is_self_contained(registered):
    """Models-from-code with explicit pins; only the peft files of the adapter were logged."""
    _, v2, _ = registered
    local = Path(mlflow.artifacts.download_artifacts(v2.model_uri))
    info = mlflow.models.Model.load(local)
    assert info.flavors["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    assert sorted(p.name for p in (local / "artifacts" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert info.metadata["weights_sha256"] == v2.weights_sha256
    assert [p.name for p in info.signature.params.params] == ["max_new_tokens", "temperature"]
    reqs = (local / "requirements.txt").read_text().split()
    for pkg in ("torch", "transformers", "peft", "mlflow"):
        assert any(r.startswith(f"{pkg}==") for r in reqs), reqs
    assert not any(r.startswith("torchvision") for r in reqs)
    imports = [line for line in (local / "pyfunc_model.py").read_text().splitlines()
               if line.startswith(("import ", "from ")) or line.startswith("        from ")]
    assert imports and not [line for line in imports if "rlhf_lightning" in line]


def test_registered_model_reproduces_the_trained_policy(registered, tiny_policy, candidate):
    """Greedy answers of `models:/rlhf-policy@candidate` equal the in-memory PEFT policy's and differ from
    the base model's: the adapter was loaded with its trained weights (not random, not ignored)."""
    model, _, _ = tiny_policy
    v1, v2, _ = registered
    tok = loading.load_tokenizer("tiny:llama")
    chats = [generation.chat_prompt(tok, p) for p in PROMPTS]
    expected = generation.sample(model, tok, chats, max_new_tokens=12, temperature=0.0)
    with model.disable_adapter():
        base_texts = generation.sample(model, tok, chats, max_new_tokens=12, temperature=0.0).texts

    out = candidate.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 12})

    assert list(out.columns) == ["response", "prompt_tokens", "completion_tokens", "weights_sha256"]
    assert out["response"].tolist() == expected.texts
    assert out["response"].tolist() != base_texts
    assert out["completion_tokens"].tolist() == expected.response_mask.sum(dim=1).tolist()
    assert out["prompt_tokens"].tolist() == expected.prompt_mask.sum(dim=1).tolist()
    assert set(out["weights_sha256"]) == {v2.weights_sha256}


@pytest.mark.parametrize("params, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 257}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
])
def test_out_of_range_params_are_rejected(candidate, params, field):
    with pytest.raises(MlflowException, match=f"params.{field} must be") as exc:
        candidate.predict(pd.DataFrame({"prompt": ["Hi"]}), params=params)
    assert exc.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


def test_empty_prompt_is_rejected(candidate):
    with pytest.raises(MlflowException, match="row 1: prompt must be a non-empty string"):
        candidate.predict(pd.DataFrame({"prompt": ["Hi", "  "]}))


def test_load_fails_when_adapter_does_not_match_registered_hash(registered):
    with pytest.raises(MlflowException, match="differs from the registered"):
        mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate", model_config={"weights_sha256": "0" * 64})
