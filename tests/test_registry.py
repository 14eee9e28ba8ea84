"""Registry: the logged pyfunc model reloads with the trained weights, versions carry tags and aliases."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from rlhf_lightning.serving import pyfunc_model
from rlhf_lightning.serving import registry
from rlhf_lightning.config import from_dict
from rlhf_lightning.models import generation, loading

PROMPTS = ["Write a one-sentence review of a small seaside cafe.", "Describe a rainy day.", "Hi"]
MODEL_NAME = "rlhf-policy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registered(mlflow_tracking, tiny_policy):
    """Version 1 (logged into the active run, promoted), then version 2 (logged by resuming a finished
    run, promoted over v1) — the two ways the flow calls it."""
    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama"}})
    with mlflow.start_run() as run:
        v1 = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id,
                                       tags={"lineage.metaflow.run_id": "1", "eval.gold_win_rate": "0.4"})
    assert registry.promote(MODEL_NAME, v1.version, "first") is None
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    v2 = registry.log_and_register(cfg, adapter_dir, base_dir, run_id, tags={"lineage.metaflow.run_id": "2"})
    assert registry.promote(MODEL_NAME, v2.version, "beat v1") == "1"
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
    # Registration alone sets only `candidate`; `champion` is `promote`'s.
    assert v1.aliases == ["candidate"] and v2.aliases == ["candidate"]
    assert v1.weights_sha256 == v2.weights_sha256

    client = MlflowClient()
    # `candidate` moved to the newest version; v1 keeps its tags but no alias.
    assert str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    assert client.get_model_version(MODEL_NAME, "1").aliases == []
    mv = client.get_model_version(MODEL_NAME, "2")
    assert mv.run_id == run_id
    champion_tags = {k: v for k, v in mv.tags.items() if k.startswith("champion.")}
    assert champion_tags.pop("champion.promoted_at")
    assert champion_tags == {"champion.previous": "1", "champion.reason": "beat v1"}
    base_tags = {k: v for k, v in mv.tags.items() if k.startswith("base.")}
    assert {k: v for k, v in mv.tags.items() if not k.startswith(("champion.", "base."))} == {
        "lineage.metaflow.run_id": "2", "weights_sha256": v2.weights_sha256, "base_model": "tiny:llama",
        "quantization": "none", "input_example": "logged; MLflow ran it through the model"}
    assert sorted(base_tags) == ["base.digest", "base.run_id", "base.store"] and base_tags["base.store"] == "shared"
    assert v2.weights_sha256 in mv.description and "| lineage.metaflow.run_id | 2 |" in mv.description
    v1_mv = client.get_model_version(MODEL_NAME, "1")
    assert v1_mv.tags["eval.gold_win_rate"] == "0.4" and v1_mv.tags["champion.previous"] == ""
    assert "| gold_win_rate | 0.4 |" in v1_mv.description


def test_logged_model_is_self_contained(registered, tiny_policy):
    """Models-from-code with explicit pins; only the peft files of the adapter were logged, the
    tokenizer, and a reference to the base with each of its files' sha256 (not the base's weights)."""
    _, v2, _ = registered
    local = Path(mlflow.artifacts.download_artifacts(v2.model_uri))
    info = mlflow.models.Model.load(local)
    assert info.flavors["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == ["adapter", "base_ref.json", "tokenizer"]
    assert sorted(p.name for p in (local / "artifacts" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not list(local.rglob("model.safetensors"))
    ref = json.loads((local / "artifacts" / "base_ref.json").read_text())
    base_dir = Path(tiny_policy[2])
    assert ref["files"]["model.safetensors"] == hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    assert ref["uri"] == f"runs:/{ref['run_id']}/base" and ref["model"] == "tiny:llama"
    assert info.metadata["weights_sha256"] == v2.weights_sha256
    # The signature declares every param and no input schema (with one, MLflow would drop a plain list's
    # unnamed column before the model sees it); the example and the request examples show the forms; the
    # limits are declared.
    assert [p.name for p in info.signature.params.params] == ["max_new_tokens", "temperature", "top_p", "seed"]
    assert info.signature.inputs is None
    forms = [sorted(r) for r in info.metadata["request_examples"]]
    assert forms == [["dataframe_records", "params"], ["dataframe_records", "params"], ["inputs"],
                     ["max_tokens", "messages", "seed", "temperature"]]
    assert info.signature.outputs.input_names() == ["response", "prompt_tokens", "completion_tokens",
                                                    "finish_reason", "weights_sha256"]
    assert info.metadata["limits"]["max_new_tokens"] == [1, 256] and info.metadata["limits"]["max_rows"] == 64
    example = json.loads((local / "serving_input_example.json").read_text())  # a ready request body
    assert example["dataframe_split"]["columns"] == ["messages"]
    assert example["dataframe_split"]["data"][0][0][-1]["role"] == "user"
    assert set(example["params"]) == {"max_new_tokens", "temperature", "top_p", "seed"}
    assert [set(e["dataframe_records"][0]) for e in info.metadata["request_examples"][:2]] == [{"prompt"}, {"messages"}]
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

    assert list(out.columns) == ["response", "prompt_tokens", "completion_tokens", "finish_reason", "weights_sha256"]
    assert out["response"].tolist() == expected.texts
    assert out["response"].tolist() != base_texts
    assert out["completion_tokens"].tolist() == expected.response_mask.sum(dim=1).tolist()
    assert out["prompt_tokens"].tolist() == expected.prompt_mask.sum(dim=1).tolist()
    assert set(out["weights_sha256"]) == {v2.weights_sha256}


def test_chat_messages_get_the_chat_template_server_side(candidate, tiny_policy):
    """A `messages` row is rendered with the tokenizer's chat template over every turn: the answer and
    its token counts equal the in-memory policy's on the same rendered conversation. A one-turn chat is
    the same request as a plain prompt."""
    model, _, _ = tiny_policy
    tok = loading.load_tokenizer("tiny:llama")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Describe a rainy day."}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected = generation.sample(model, tok, [rendered], max_new_tokens=10, temperature=0.0)
    out = candidate.predict(pd.DataFrame({"messages": [chat]}), params={"max_new_tokens": 10})
    assert out["response"].tolist() == expected.texts
    assert out["prompt_tokens"].tolist() == expected.prompt_mask.sum(dim=1).tolist()
    one_turn = candidate.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "Hi"}]]}))
    plain = candidate.predict(pd.DataFrame({"prompt": ["Hi"]}))
    assert one_turn.drop(columns="weights_sha256").equals(plain.drop(columns="weights_sha256"))


def test_seed_top_p_and_finish_reason(candidate):
    rows = pd.DataFrame({"prompt": ["Hi", "Describe a rainy day.", "Tell me about cafes."]})
    params = {"max_new_tokens": 12, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    first, again = candidate.predict(rows, params=params), candidate.predict(rows, params=params)
    assert first.equals(again)  # same seed, same request: same answers
    others = [candidate.predict(rows, params={**params, "seed": s})["response"].tolist() for s in (8, 9)]
    assert first["response"].tolist() not in others or others[0] != others[1]
    # finish_reason: "length" exactly when the answer used the whole budget without an end token.
    cut = candidate.predict(rows, params={"max_new_tokens": 2, "temperature": 0.0})
    assert cut["finish_reason"].tolist() == ["length" if n == 2 else "stop" for n in cut["completion_tokens"]]
    assert set(first["finish_reason"]) <= {"stop", "length"}


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 0}, "params.max_new_tokens must be an integer in [1, 256], got 0"),
    ({"max_new_tokens": 257}, "params.max_new_tokens must be"),
    ({"temperature": -0.1}, "params.temperature must be a number in [0.0, 2.0]"),
    ({"temperature": 2.5}, "params.temperature must be"),
    ({"top_p": 0.0}, "params.top_p must be a number in (0.0, 1.0]"),
    ({"top_p": 1.5}, "params.top_p must be"),
    ({"seed": -1}, "params.seed must be an integer in [0, 2147483647]"),
])
def test_out_of_range_params_are_rejected(candidate, params, message):
    with pytest.raises(MlflowException) as exc:
        candidate.predict(pd.DataFrame({"prompt": ["Hi"]}), params=params)
    assert message in exc.value.message
    assert exc.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"prompt": ["Hi", "  "]}), "input row 1: prompt must be a non-empty string"),
    (pd.DataFrame({"text": ["Hi"]}), "input needs a 'prompt' (string) or 'messages'"),
    (pd.DataFrame({"prompt": ["Hi"] * 65}), "65 rows in one request; send at most 64"),
    (pd.DataFrame({"prompt": ["x" * 40000]}), "input row 0: the prompt is 40000 characters; this model accepts at most 32768"),
    (pd.DataFrame({"messages": [[]]}), "input row 0: messages must be a non-empty list"),
    (pd.DataFrame({"messages": [[{"role": "robot", "content": "Hi"}]]}),
     "input row 0: messages[0].role must be one of ['system', 'user', 'assistant'] (or 'developer'), got 'robot'"),
    (pd.DataFrame({"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]}),
     "input row 0: the last message must be from 'user'"),
    (pd.DataFrame({"messages": [[{"role": "user", "content": " "}]]}), "input row 0: messages[0].content is empty"),
    (pd.DataFrame({"messages": [[{"role": "user"}]]}), "input row 0: messages[0] must be"),
    (pd.DataFrame({"prompt": ["Hi"], "messages": [[{"role": "user", "content": "Hi"}]]}),
     "input row 0: give exactly one of 'prompt' and 'messages', not both"),
])
def test_bad_rows_are_rejected_with_their_row_and_field(candidate, frame, message):
    """Checked by the model itself (the pyfunc wrapper enforces the signature first: unknown columns,
    wrong types). Each is an HTTP 400 when served."""
    with pytest.raises(MlflowException) as exc:
        candidate.unwrap_python_model().predict(None, frame)
    assert message in exc.value.message
    assert exc.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


def test_load_fails_when_adapter_does_not_match_registered_hash(registered):
    with pytest.raises(MlflowException, match="differs from the registered"):
        mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate", model_config={"weights_sha256": "0" * 64})


def test_rollback_moves_champion_back_and_the_cli_reports_it(registered, mlflow_tracking):
    """`promote` recorded what each champion replaced; rollback walks back along it. Restores v2 after."""
    client = MlflowClient()
    champion = lambda: str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)  # noqa: E731
    assert registry.rollback(MODEL_NAME) == ("2", "1")
    assert champion() == "1" and "champion.rolled_back_at" in client.get_model_version(MODEL_NAME, "2").tags
    with pytest.raises(registry.RegistryError, match="did not replace an earlier champion; name the version"):
        registry.rollback(MODEL_NAME)  # v1 replaced nothing
    with pytest.raises(registry.RegistryError, match="version 9 not found"):
        registry.rollback(MODEL_NAME, "9")

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    cli = [sys.executable, "-m", "rlhf_lightning", "rollback", "--model-name", MODEL_NAME]
    done = subprocess.run(cli + ["--to", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rlhf-policy@champion: version 1 -> 2" in done.stdout and champion() == "2"
    failed = subprocess.run(cli + ["--to", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 1 and "already is version 2" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_model_uris_resolve_to_name_and_version_or_say_what_exists(registered):
    """What `serve` and the deployments client check before they load anything."""
    assert registry.resolve_model_uri(f"models:/{MODEL_NAME}@champion") == (MODEL_NAME, "2")
    assert registry.resolve_model_uri(f"models:/{MODEL_NAME}/1") == (MODEL_NAME, "1")
    assert registry.resolve_model_uri(f"models:/{MODEL_NAME}/latest") == (MODEL_NAME, "2")
    assert registry.resolve_model_uri("runs:/abc/model") is None
    with pytest.raises(registry.RegistryError, match=r"has no version '7' \(it has versions 1\.\.2; stages"):
        registry.resolve_model_uri(f"models:/{MODEL_NAME}/7")
    with pytest.raises(registry.RegistryError, match=r"has no version 'Production'"):
        registry.resolve_model_uri(f"models:/{MODEL_NAME}/Production")
    with pytest.raises(registry.RegistryError, match=r"has no alias 'best' \(its aliases: candidate -> v2, champion -> v2\)"):
        registry.resolve_model_uri(f"models:/{MODEL_NAME}@best")
    with pytest.raises(registry.RegistryError, match=rf"name a version or an alias: models:/{MODEL_NAME}/VERSION"):
        registry.resolve_model_uri(f"models:/{MODEL_NAME}")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.resolve_model_uri("models:/nope/1")


def test_the_served_model_stops_at_every_end_token_of_its_generation_config(tiny_policy, tmp_path):
    """A base whose generation_config lists a second end token (Gemma's <end_of_turn>, Llama 3's
    <|eot_id|>), here the pad token as well (pad == an end token must not cut the answer short): the
    served model stops there, says "stop", and counts the end token."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_lightning.serving.pyfunc_model import RLHFPolicyModel

    _, adapter_dir, base_dir = tiny_policy
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        base.model.norm.weight.zero_()  # every logit 0: greedy decoding picks token 0, the pad token
    assert tok.pad_token_id == 0 != tok.eos_token_id
    base.generation_config.eos_token_id = [tok.eos_token_id, 0]
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    served = RLHFPolicyModel()
    served.load_context(SimpleNamespace(artifacts={"base": str(tmp_path / "base"), "adapter": adapter_dir},
                                        model_config={}))
    out = served.predict(None, pd.DataFrame({"prompt": ["Hi"]}), params={"max_new_tokens": 5, "temperature": 0.0})
    assert out[["response", "completion_tokens", "finish_reason"]].values.tolist() == [["", 1, "stop"]]


def test_a_version_is_registered_with_an_example_its_template_answers(mlflow_tracking, tiny_policy, tmp_path):
    """A template that refuses system messages, with folding off: the version's input example (which
    MLflow runs through the model as a serving check) holds no system message, and the version records
    that template, so that the served model renders as training did."""
    from chat_templates import GEMMA
    from mlflow.models import Model

    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama", "chat_template": GEMMA, "fold_system": False},
                     "registry": {"model_name": "rlhf-policy-gemma"}})
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})
    model = Model.load(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    example = model.load_input_example(str(tmp_path))
    example = example[0] if isinstance(example, tuple) else example
    assert [m["role"] for m in example["messages"].iloc[0]] == ["user"]
    served = mlflow.pyfunc.load_model(info.model_uri)
    answer = served.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "Hi"}]]}),
                            params={"max_new_tokens": 2, "temperature": 0.0})
    assert len(answer) == 1


def _stored(root: Path) -> dict[str, int]:
    """{path: size} of every file in an artifact store."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _other_adapter(adapter_dir: str, dst: Path) -> str:
    """A second policy on the same base: the adapter's weights, changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, dst)
    weights = load_file(dst / "adapter_model.safetensors")
    save_file({k: v + 0.25 for k, v in weights.items()}, dst / "adapter_model.safetensors")
    return str(dst)


def test_a_base_is_stored_once_and_a_second_version_adds_only_its_adapter(mlflow_tracking, tiny_policy, tmp_path):
    """Ten PPO runs of one base must not store ten copies of it: the second version on a base adds the
    model files, tokenizer and adapter, none of the base's weights, and references the same base run.
    Both versions serve from it, each with its own weights."""
    _, adapter_dir, base_dir = tiny_policy
    name = "rlhf-policy-once"
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "registry": {"model_name": name}})
    store = mlflow_tracking / "artifacts"
    with mlflow.start_run() as run:
        first = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})
    before = _stored(store)
    with mlflow.start_run() as run:
        second = registry.log_and_register(cfg, _other_adapter(adapter_dir, tmp_path / "a2"), base_dir,
                                           run.info.run_id, tags={})
    added = {k: n for k, n in _stored(store).items() if k not in before}

    client = MlflowClient()
    tags = [client.get_model_version(name, v.version).tags for v in (first, second)]
    files = pyfunc_model.base_manifest(base_dir)
    digest = pyfunc_model.manifest_digest(files)
    assert tags[0]["base.digest"] == tags[1]["base.digest"] == digest
    assert tags[0]["base.run_id"] == tags[1]["base.run_id"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments, filter_string=f"tags.`rlhf.base.digest` = '{digest}'")) == 1
    # What the second version added: its own small files, one weights file (the adapter's).
    assert sorted(Path(k).name for k in added if k.endswith(".safetensors")) == ["adapter_model.safetensors"]
    assert not any("/base/" in k for k in added)
    base_bytes = sum((Path(base_dir) / f).stat().st_size for f in files)
    assert sum(added.values()) < base_bytes / 2, (sum(added.values()), base_bytes)

    answers = [mlflow.pyfunc.load_model(v.model_uri).predict(pd.DataFrame({"prompt": PROMPTS}),
                                                                params={"max_new_tokens": 8}) for v in (first, second)]
    assert [set(a["weights_sha256"]) for a in answers] == [{first.weights_sha256}, {second.weights_sha256}]
    assert first.weights_sha256 != second.weights_sha256
    assert answers[0]["response"].tolist() != answers[1]["response"].tolist()


def test_the_served_base_is_checked_file_by_file(registered, monkeypatch, tmp_path):
    """A base downloaded into the cache is checked against the sha256 recorded at registration on every
    load: a damaged cached copy is fetched again; a stored base changed after registration stops the
    load with the file named, and is not cached."""
    _, v2, _ = registered
    monkeypatch.setenv(pyfunc_model.BASE_CACHE_ENV, str(tmp_path / "cache"))
    tags = MlflowClient().get_model_version(MODEL_NAME, v2.version).tags
    cached = tmp_path / "cache" / tags["base.digest"]
    mlflow.pyfunc.load_model(v2.model_uri)
    config = (cached / "config.json").read_text()
    (cached / "config.json").write_text("{}")
    mlflow.pyfunc.load_model(v2.model_uri)
    assert (cached / "config.json").read_text() == config

    run_root = urllib.parse.urlparse(MlflowClient().get_run(tags["base.run_id"]).info.artifact_uri).path
    stored = Path(run_root) / "base" / "model.safetensors"
    original = stored.read_bytes()
    shutil.rmtree(cached)
    stored.write_bytes(original + b"\0")
    try:
        with pytest.raises(MlflowException, match=r"does not match the files registered .*differ: \['model.safetensors'\]"):
            mlflow.pyfunc.load_model(v2.model_uri)
    finally:
        stored.write_bytes(original)
    assert not cached.exists() and not list((tmp_path / "cache").iterdir())


def test_a_version_with_its_base_inside_serves_the_same_answers(mlflow_tracking, tiny_policy, candidate, tmp_path):
    """`registry.base_store: copy` (and every version registered before bases were shared) holds the
    whole base: it loads without the base run and answers exactly as the shared-base version does."""
    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama"},
                     "registry": {"model_name": "rlhf-policy-copy", "base_store": "copy"}})
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    # MLflow names an artifact directory after its source: the base is `llama-v1`, tiny:llama's directory.
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == ["adapter", Path(base_dir).name]
    assert (local / "artifacts" / Path(base_dir).name / "model.safetensors").is_file()
    assert "base.run_id" not in MlflowClient().get_model_version(info.name, info.version).tags
    rows, params = pd.DataFrame({"prompt": PROMPTS}), {"max_new_tokens": 10}
    copied = mlflow.pyfunc.load_model(str(local)).predict(rows, params=params)
    assert copied.equals(candidate.predict(rows, params=params))


def test_a_hub_base_is_referenced_by_id_and_commit(mlflow_tracking, tiny_policy, candidate, tmp_path, monkeypatch):
    """`base_store: hub`: the version names the hub id and the commit its snapshot came from, stores none
    of the base, and the served model loads that snapshot through huggingface_hub (here from a hub cache
    laid out as huggingface_hub writes it, offline), checking every file; a changed file stops it."""
    import huggingface_hub.constants

    _, adapter_dir, base_dir = tiny_policy
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(base_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert loading.base_model_dir("acme/tiny-chat", str(tmp_path / "work")) == str(snapshot)

    cfg = from_dict({"policy": {"model": "acme/tiny-chat"},
                     "registry": {"model_name": "rlhf-policy-hub", "base_store": "hub"}})
    store = mlflow_tracking / "artifacts"
    before = _stored(store)
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, adapter_dir, str(snapshot), run.info.run_id, tags={})
    added = [k for k in _stored(store) if k not in before]
    assert [Path(k).name for k in added if k.endswith(".safetensors")] == ["adapter_model.safetensors"]
    assert MlflowClient().get_model_version(info.name, info.version).tags["base.hub"] == f"acme/tiny-chat@{commit}"
    rows, params = pd.DataFrame({"prompt": PROMPTS}), {"max_new_tokens": 10}
    assert mlflow.pyfunc.load_model(info.model_uri).predict(rows, params=params).equals(
        candidate.predict(rows, params=params))

    (snapshot / "config.json").write_text((snapshot / "config.json").read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(MlflowException, match=r"hub acme/tiny-chat@0123.*differ: \['config.json'\]"):
        mlflow.pyfunc.load_model(info.model_uri)

    from rlhf_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"registry.base_store: hub needs policy.model to be a hub id .*'tiny:llama'"):
        from_dict({"policy": {"model": "tiny:llama"}, "registry": {"base_store": "hub"}})
    # A hub id whose local copy is not a hub snapshot (saved elsewhere) cannot be referenced either.
    with mlflow.start_run() as run, pytest.raises(registry.RegistryError, match="hub needs policy.model to be a hub id"):
        registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})


def test_a_base_too_big_for_the_step_is_registered_without_running_the_example(mlflow_tracking, tiny_policy,
                                                                                   tmp_path, capsys, monkeypatch):
    """MLflow runs an input example through the whole model while logging it; a base whose fp32 load
    would take more than half the memory left is logged without one, and the version says why."""
    from mlflow.models import Model
    from safetensors.torch import load_file

    _, adapter_dir, base_dir = tiny_policy
    numel = sum(t.numel() for t in load_file(f"{base_dir}/model.safetensors").values())
    assert registry.fp32_bytes(base_dir) == 4 * numel
    assert registry.example_check(base_dir, available=8 * numel) == (True, "")
    ok, note = registry.example_check(base_dir, available=8 * numel - 1)
    assert not ok and "in fp32" in note

    monkeypatch.setattr(registry.hardware, "available_memory", lambda: 4 * numel)
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "registry": {"model_name": "rlhf-policy-big"}})
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})
    assert "logged without an input example" in capsys.readouterr().out
    model = Model.load(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    assert model.saved_input_example_info is None and model.signature is not None
    tag = MlflowClient().get_model_version("rlhf-policy-big", info.version).tags["input_example"]
    assert "logged without an input example" in tag
    served = mlflow.pyfunc.load_model(info.model_uri)  # the version itself serves as any other
    assert len(served.predict(pd.DataFrame({"prompt": ["Hi"]}), params={"max_new_tokens": 2})) == 1
