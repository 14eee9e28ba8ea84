"""The `rlhf-vllm` deployments target: a registered version served by a real vLLM OpenAI server (CPU build),
spoken to with the `openai` client as users' code does (chat completions, streaming, a bad request), and the
flow's inference checks through the same MLflow deployments client. The answers are the version's: greedy
in fp32, token for token what `rlhf-local`'s pyfunc answers."""

from __future__ import annotations

import importlib.util
import json

import mlflow
import openai
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf_lightning.config import from_dict
from rlhf_lightning.serving import deployments, registry
from rlhf_lightning.serving.inference import serving_checks

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make setup installs it)"),
    pytest.mark.usefixtures("one_torch_thread"),
]
MODEL_NAME = "rlhf-policy"
NAME = "rlhf-policy-vllm"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a rainy day."}]


@pytest.fixture(scope="module")
def version(mlflow_tracking, tmp_path_factory):
    """A policy on a tiny base whose attention heads vLLM's CPU kernels take (32 wide), with an adapter
    that visibly changes its answers, registered as rlhf-policy."""
    from test_engines import build_tiny32, randomised_policy

    base = build_tiny32(tmp_path_factory.mktemp("tiny32") / "model")
    model = randomised_policy(base, 0.5, 0)
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter)
    cfg = from_dict({"policy": {"model": base}})
    with mlflow.start_run() as run:
        return registry.log_and_register(cfg, str(adapter), base, run.info.run_id, tags={})


@pytest.fixture(scope="module")
def client(version, tmp_path_factory):
    """The deployment, created through the MLflow deployments client (vLLM must start and answer /health
    before it is recorded), and its server, started once for the module."""
    client = deployments.get_client("rlhf-vllm")
    config = {"dtype": "float32", "max_model_len": 512, "kv_cache_gib": 1, "startup_timeout": 300}
    client.create_deployment(NAME, version.model_uri, config=config)
    client.serve(NAME)
    yield client
    client.close()


@pytest.fixture(scope="module")
def openai_client(client):
    return openai.OpenAI(base_url=f"{client.serve(NAME)}/v1", api_key="not-needed", max_retries=0)


def test_the_deployment_is_recorded_and_served_under_the_versions_name(client, version, openai_client):
    record = client.get_deployment(NAME)
    assert record["target"] == "rlhf-vllm" and record["model_uri"] == version.model_uri
    tags = MlflowClient().get_registered_model(MODEL_NAME).tags
    assert json.loads(tags[f"deployment.rlhf-vllm.{NAME}"])["version"] == version.version
    assert [m.id for m in openai_client.models.list().data] == [f"{MODEL_NAME}/{version.version}"]
    # The server serves the directory prepared from the adapter whose sha256 was registered.
    from rlhf_lightning.serving.vllm_server import served_sha256

    assert served_sha256(client.serve(NAME), f"{MODEL_NAME}/{version.version}") == version.weights_sha256


def test_openai_chat_completions_answer_as_the_registered_version(openai_client, version):
    out = openai_client.chat.completions.create(model=f"{MODEL_NAME}/{version.version}", messages=CHAT,
                                                max_tokens=8, temperature=0)
    local = mlflow.pyfunc.load_model(version.model_uri).predict([CHAT], params={"max_new_tokens": 8}).iloc[0]
    assert out.choices[0].message.content.strip() == local["response"]
    assert out.usage.completion_tokens == local["completion_tokens"]
    assert out.usage.prompt_tokens == local["prompt_tokens"]  # the same template, the same tokens
    assert out.choices[0].finish_reason == local["finish_reason"]


def test_streaming_sends_the_answer_in_pieces(openai_client, version):
    model = f"{MODEL_NAME}/{version.version}"
    whole = openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                                        stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_a_bad_request_is_a_400_and_the_server_keeps_serving(openai_client, version):
    model = f"{MODEL_NAME}/{version.version}"
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=-1)
    assert exc.value.status_code == 400 and "max_tokens" in str(exc.value)
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=2).choices


def test_the_deployments_client_predicts_rows_chat_bodies_and_streams(client, version):
    rows = client.predict(NAME, [{"prompt": "Hi"}, {"messages": CHAT}], params={"max_new_tokens": 4})["predictions"]
    local = mlflow.pyfunc.load_model(version.model_uri).predict(["Hi", CHAT], params={"max_new_tokens": 4})
    assert [r["response"] for r in rows] == local["response"].tolist()
    assert {r["weights_sha256"] for r in rows} == {version.weights_sha256}
    seeded = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    assert client.predict(NAME, ["Hi", "Hi"], params=seeded) == client.predict(NAME, ["Hi", "Hi"], params=seeded)

    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    completion = client.predict(NAME, body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in client.predict_stream(NAME, body) if c["choices"])
    assert streamed == completion["choices"][0]["message"]["content"]
    with pytest.raises(MlflowException, match="HTTP 400"):
        client.predict(NAME, {"messages": CHAT, "max_tokens": -1})


def test_the_flows_deploy_and_inference_stages_on_serving_target_rlhf_vllm(client, version):
    """`serving.target: rlhf-vllm`: the deploy stage updates the deployment through the deployments API,
    and the inference stage (its own client, its own server: another container in a Batch run) checks
    the served version and weights and moves champion. Wrong registered weights fail the checks."""
    from rlhf_lightning import pipeline, tracking

    serving = {"target": "rlhf-vllm", "deployment_name": NAME, "startup_timeout": 300,
               "target_config": {"dtype": "float32", "max_model_len": 512, "kv_cache_gib": 1},
               "requests": [{"prompt": "Write a one-sentence review of a small seaside cafe.", "max_new_tokens": 8}]}
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "serving": serving})
    # The checks fail when the served weights are not the ones registered (checked on the module's server).
    wrong = serving_checks(client, NAME, version.model_uri, cfg.serving.requests, "0" * 64)
    assert [c.name for c in wrong.failures] == ["request[0].weights_sha256_matches"]

    parent = tracking.start_parent_run(cfg, flow_name="VLLMDeployTest", run_id="1")
    client.close()  # the module's server; deploy's load check and inference start their own
    endpoint = pipeline.deploy(cfg, parent, version)
    assert endpoint.target == "rlhf-vllm" and client.get_deployment(NAME)["version"] == version.version
    evaluation = pipeline.Evaluated(metrics={}, promote=True, reason="test gate passed", champion="", mlflow_run_id="")
    served, info = pipeline.inference(cfg, parent, version, endpoint, evaluation)  # serves and checks it
    assert served.ok and "champion" in info.aliases
    answers = served.report["answers"]
    assert answers[0]["weights_sha256"] == version.weights_sha256 and answers[0]["response"]
