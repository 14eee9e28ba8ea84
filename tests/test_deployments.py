"""The project's MLflow deployments target `rlhf-local`, through `mlflow.deployments` as the flow uses it:
deployments recorded in the Model Registry (so another process, another container, finds them), real
`mlflow models serve` processes started by the client that needs them, the inference template and the
checkpoint checks over it, and `champion` moving only after they pass."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from openai.types.chat import ChatCompletion

from rlhf_lightning.serving import deployments
from rlhf_lightning.serving import registry
from rlhf_lightning.serving import server as serving
from rlhf_lightning.config import InferenceRequest, from_dict
from rlhf_lightning.serving.inference import check_deployment, run_inference_template

MODEL_NAME = "rlhf-policy"
NAME = "rlhf-policy-candidate"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Greedy, so the answers are deterministic (a tiny random model samples an immediate end token now
# and then, which would make the non-empty-response check flaky).
TEMPLATE = [
    InferenceRequest(prompt="Write a one-sentence review of a small seaside cafe.", max_new_tokens=8),
    InferenceRequest(prompt="Describe a rainy Sunday afternoon in one sentence.", max_new_tokens=5),
]
CONFIG = {"startup_timeout": 120}


@pytest.fixture(scope="module")
def client(registered_policy):
    client = deployments.get_client("rlhf-local")
    client.create_deployment(NAME, f"models:/{MODEL_NAME}/{registered_policy.version}", config=CONFIG)
    yield client
    client.close()


def test_the_deployment_is_a_registry_record_any_process_finds(client, registered_policy):
    record = client.get_deployment(NAME)
    assert record["model_uri"] == f"models:/{MODEL_NAME}/{registered_policy.version}"
    assert record["config"] == {"host": "127.0.0.1", "port": 0, "startup_timeout": 120.0}
    tags = MlflowClient().get_registered_model(MODEL_NAME).tags
    assert json.loads(tags[f"deployment.rlhf-local.{NAME}"])["version"] == registered_policy.version
    assert [d["name"] for d in client.list_deployments()] == [NAME]
    # A fresh client (another step, another container) knows it through the tracking server alone.
    assert deployments.get_client("rlhf-local").get_deployment(NAME) == record
    with pytest.raises(MlflowException, match="exists; use update_deployment"):
        client.create_deployment(NAME, record["model_uri"])
    with pytest.raises(MlflowException, match="no rlhf-local deployment named 'nope'"):
        client.get_deployment("nope")
    with pytest.raises(MlflowException, match="deploys registered models"):
        client.create_deployment("other", "runs:/abc/model")


def test_predict_starts_a_real_server_of_the_recorded_version(client, registered_policy):
    out = client.predict(NAME, pd.DataFrame([{"prompt": "Hi"}, {"prompt": "Describe a cafe."}]),
                         params={"max_new_tokens": 3})
    assert [a["weights_sha256"] for a in out["predictions"]] == [registered_policy.weights_sha256] * 2
    assert all(1 <= a["completion_tokens"] <= 3 for a in out["predictions"])
    url = client.serve(NAME)  # the server predict started, reused
    with urllib.request.urlopen(f"{url}/ping", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(serving.ServingError, match=r"(?s)HTTP 400: .*max_new_tokens must be an integer in \[1, 256\], got 999"):
        client.predict(NAME, [{"prompt": "Hi"}], params={"max_new_tokens": 999})


def test_a_chat_completions_body_through_the_deployments_client(client, registered_policy):
    """The body an OpenAI client sends, through MLflow's deployments client: answered in the Chat
    Completions form the `openai` package parses, as the row form answers the same chat."""
    chat = [{"role": "user", "content": "Describe a cafe."}]
    out = client.predict(NAME, {"messages": chat, "max_tokens": 4, "temperature": 0, "n": 2})
    completion = ChatCompletion.model_validate(dict(out))
    row = client.predict(NAME, [{"messages": chat}], params={"max_new_tokens": 4})["predictions"][0]
    assert [c.message.content for c in completion.choices] == [row["response"]] * 2  # greedy: n equal answers
    assert completion.usage.completion_tokens == 2 * row["completion_tokens"]
    assert out["weights_sha256"] == registered_policy.weights_sha256
    with pytest.raises(MlflowException, match="stream from the rlhf-vllm deployment target"):
        client.predict(NAME, {"messages": chat, "stream": True})


def test_inference_template_and_checkpoint_checks_through_the_client(client, registered_policy):
    report = run_inference_template(client, NAME, TEMPLATE, registered_policy.weights_sha256)
    assert report.ok, report.failures
    assert len(report.answers) == 2 and len(report.checks) == 8
    assert all(a.completion_tokens <= r.max_new_tokens for a, r in zip(report.answers, TEMPLATE))

    other = run_inference_template(client, NAME, TEMPLATE, "0" * 64)
    assert [c.name for c in other.failures] == ["request[0].weights_sha256_matches",
                                                "request[1].weights_sha256_matches"]
    rejected = run_inference_template(client, NAME, [InferenceRequest(prompt="Hi", max_new_tokens=999)],
                                      registered_policy.weights_sha256)
    assert [c.name for c in rejected.checks] == ["request[0].answered"] and not rejected.ok
    assert "max_new_tokens" in rejected.answers[0].error

    uri = f"models:/{MODEL_NAME}/{registered_policy.version}"
    assert check_deployment(client, NAME, uri).ok
    assert not check_deployment(client, NAME, f"models:/{MODEL_NAME}/999").ok
    missing = check_deployment(client, "nope", uri)
    assert missing.name == "deployment.exists" and not missing.ok


def test_mlflow_cli_finds_the_target_through_its_entry_point(client, registered_policy):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, "-m", "mlflow", "deployments", "get", "-t", "rlhf-local", "--name", NAME],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"models:/{MODEL_NAME}/{registered_policy.version}" in done.stdout


def test_close_stops_the_servers_unless_asked_to_keep_them(registered_policy):
    keeper = deployments.get_client("rlhf-local")
    keeper.serve(NAME)
    left = keeper.close(keep_running=True)
    assert set(left) == {NAME}
    try:
        assert serving.predict(left[NAME]["url"], ["Hi"], {"max_new_tokens": 2})  # still answering
    finally:
        serving.stop_pid(left[NAME]["pid"])
    stopper = deployments.get_client("rlhf-local")
    stopper.serve(NAME)
    pid = stopper._servers[NAME].pid
    assert stopper.close() == {}
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_champion_moves_only_after_the_deployed_candidate_passes(client, registered_policy, tiny_policy):
    """The inference stage with the gate's promote=True, against a deployment made by the deploy stage:
    when the deployment does not serve the weights the version was registered with, the checks fail
    and `champion` stays where it was; when they pass, champion moves to the candidate and records the
    version it replaced. Then delete removes the record."""
    from rlhf_lightning import pipeline, tracking

    registry.promote(MODEL_NAME, registered_policy.version, "test")  # v1 is the champion
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "serving": {"startup_timeout": 120}})
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, requests=TEMPLATE))
    with mlflow.start_run() as run:  # v2: a new candidate (same weights) on top of the champion v1
        v2 = registry.log_and_register(cfg, tiny_policy[1], tiny_policy[2], run.info.run_id, tags={})
    parent = tracking.start_parent_run(cfg, flow_name="DeployTest", run_id="1")
    endpoint = pipeline.deploy(cfg, parent, v2)  # the deployment exists: updated to v2
    assert endpoint == pipeline.Endpoint(target="rlhf-local", name=NAME, model_uri=f"models:/{MODEL_NAME}/{v2.version}",
                                         alias="candidate", version=v2.version)
    assert client.get_deployment(NAME)["version"] == v2.version
    evaluation = pipeline.Evaluated(metrics={}, promote=True, reason="test gate passed", champion="", mlflow_run_id="")
    registry_client = MlflowClient()
    champion = lambda: str(registry_client.get_model_version_by_alias(MODEL_NAME, "champion").version)  # noqa: E731

    wrong = dataclasses.replace(v2, weights_sha256="0" * 64)
    with pytest.raises(RuntimeError, match="inference checks failed, champion not moved: .*weights_sha256_matches"):
        pipeline.inference(cfg, parent, wrong, endpoint, evaluation)
    assert champion() == registered_policy.version

    served, info = pipeline.inference(cfg, parent, v2, endpoint, evaluation)
    assert served.ok and served.endpoint is None  # serving.keep_running is off: stopped
    assert "champion" in info.aliases and champion() == v2.version
    assert registry_client.get_model_version(MODEL_NAME, v2.version).tags["champion.previous"] == registered_policy.version

    client.delete_deployment(NAME)
    assert client.list_deployments() == []
    assert f"deployment.rlhf-local.{NAME}" not in registry_client.get_registered_model(MODEL_NAME).tags
