"""A real `mlflow models serve` process of the registered policy: REST answers, limits, identity checks."""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from openai.types.chat import ChatCompletion

from rlhf_lightning.serving import registry
from rlhf_lightning.serving import server as serving
from rlhf_lightning.config import InferenceRequest
from rlhf_lightning.serving.inference import check_registered_version
from rlhf_lightning.models import generation, loading

MODEL_NAME = "rlhf-policy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Greedy, so the answers are deterministic (a tiny random model samples an immediate end token now
# and then, which would make the non-empty-response check flaky).
TEMPLATE = [
    InferenceRequest(prompt="Write a one-sentence review of a small seaside cafe.", max_new_tokens=8),
    InferenceRequest(prompt="Describe a rainy Sunday afternoon in one sentence.", max_new_tokens=5),
]


@pytest.fixture(scope="module")
def registered(registered_policy):
    """The registered tiny policy, promoted to champion (the alias the server below serves)."""
    registry.promote(registered_policy.name, registered_policy.version, "test")
    return registered_policy


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """One server for the whole module (startup ~10 s), serving the alias as the deploy step does.
    On teardown, every process of the server's group must be gone."""
    log_dir = tmp_path_factory.mktemp("serve")
    # One torch thread: for a tiny model on 2 shared cores, spinning intra-op threads are ~100x slower.
    with serving.ModelServer(f"models:/{MODEL_NAME}@champion", startup_timeout=120, log_dir=log_dir,
                             env={"OMP_NUM_THREADS": "1"}) as srv:
        pgid = srv.pid
        yield srv
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_health_endpoints(server):
    for route in ("/ping", "/health", "/version"):
        with urllib.request.urlopen(f"{server.url}{route}", timeout=5) as resp:
            assert resp.status == 200, route


def test_invocations_answer_like_the_trained_policy(server, registered, tiny_policy):
    model, _, _ = tiny_policy
    prompts = [r.prompt for r in TEMPLATE] + ["Hi"]
    answers = serving.predict(server.url, prompts, {"max_new_tokens": 6})

    tok = loading.load_tokenizer("tiny:llama")
    expected = generation.sample(model, tok, [generation.chat_prompt(tok, p) for p in prompts],
                                 max_new_tokens=6, temperature=0.0)
    assert [a["response"] for a in answers] == expected.texts
    assert [a["completion_tokens"] for a in answers] == expected.response_mask.sum(dim=1).tolist()
    assert all(1 <= a["completion_tokens"] <= 6 and a["prompt_tokens"] > 0 for a in answers)
    assert {a["weights_sha256"] for a in answers} == {registered.weights_sha256}


def test_sampling_honours_params(server):
    answers = serving.predict(server.url, ["Hi", "Describe a cafe."], {"max_new_tokens": 3, "temperature": 1.5})
    assert [sorted(a) for a in answers] == [
        ["completion_tokens", "finish_reason", "prompt_tokens", "response", "weights_sha256"]] * 2
    assert all(a["completion_tokens"] <= 3 for a in answers)


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 1000}, "params.max_new_tokens must be an integer in [1, 256], got 1000"),
    ({"temperature": -1}, "params.temperature must be a number in [0.0, 2.0]"),
    ({"max_new_tokens": "many"}, "max_new_tokens"),  # rejected by MLflow's ParamSchema type check
])
def test_out_of_range_params_are_a_client_error_and_the_server_keeps_serving(server, params, message):
    result = serving.invoke(server.url, {"dataframe_records": [{"prompt": "Hi"}], "params": params})
    assert result.status == 400
    assert message in result.error_message
    with pytest.raises(serving.ServingError, match="HTTP 400"):
        serving.predict(server.url, ["Hi"], params)
    assert len(serving.predict(server.url, ["Hi"], {"max_new_tokens": 2})) == 1


def test_chat_messages_and_seeded_sampling_over_http(server):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a cafe."}]
    params = {"max_new_tokens": 6, "temperature": 1.2, "top_p": 0.9, "seed": 3}
    first = serving.predict(server.url, [chat, [{"role": "user", "content": "Hi"}]], params)
    assert first == serving.predict(server.url, [chat, [{"role": "user", "content": "Hi"}]], params)
    assert all(a["finish_reason"] in ("stop", "length") and a["prompt_tokens"] > 0 for a in first)


def test_every_mlflow_request_form_is_accepted(server):
    """dataframe_records, dataframe_split, instances and inputs all reach the same model with prompts.
    (Chats go as dataframe_records/dataframe_split: MLflow's schema check rejects `instances` of
    nested lists of objects before the model sees them.)"""
    expected = serving.predict(server.url, ["Hi", "Describe a cafe."], {"max_new_tokens": 3})
    for body in ({"dataframe_split": {"columns": ["prompt"], "data": [["Hi"], ["Describe a cafe."]]}},
                 {"instances": [{"prompt": "Hi"}, {"prompt": "Describe a cafe."}]},
                 {"inputs": {"prompt": ["Hi", "Describe a cafe."]}}):
        result = serving.invoke(server.url, {**body, "params": {"max_new_tokens": 3}})
        assert result.status == 200, result.body
        assert result.body["predictions"] == expected, body


def test_a_plain_list_of_prompts_is_prompts_over_rest_and_in_python(server, registered):
    expected = serving.predict(server.url, ["Hi", "Describe a cafe."], {"max_new_tokens": 3})
    for body in ({"inputs": ["Hi", "Describe a cafe."]}, {"instances": ["Hi", "Describe a cafe."]}):
        result = serving.invoke(server.url, {**body, "params": {"max_new_tokens": 3}})
        assert result.status == 200, result.body
        assert result.body["predictions"] == expected, body
    model = mlflow.pyfunc.load_model(registered.model_uri)
    in_python = model.predict(["Hi", "Describe a cafe."], params={"max_new_tokens": 3})
    assert in_python.to_dict("records") == expected


def test_chat_completions_body_gets_a_chat_completions_answer(server, registered):
    """The body the openai client sends to /chat/completions, posted to /invocations, is answered in
    its response form, which the openai package's own types parse; it answers as the row form does."""
    chat = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Describe a cafe."}]
    body = {"model": "rlhf-policy", "messages": chat, "max_tokens": 5, "temperature": 0.0}
    result = serving.invoke(server.url, body)
    assert result.status == 200, result.body
    completion = ChatCompletion.model_validate(result.body)
    row = serving.predict(server.url, [[{"role": "system", "content": "Be brief."}, chat[1]]],
                          {"max_new_tokens": 5})[0]
    assert completion.choices[0].message.content == row["response"]
    assert completion.choices[0].finish_reason == row["finish_reason"]
    assert completion.usage.prompt_tokens == row["prompt_tokens"]
    assert completion.usage.completion_tokens == row["completion_tokens"]
    assert completion.usage.total_tokens == row["prompt_tokens"] + row["completion_tokens"]
    assert completion.model == "rlhf-policy" and result.body["weights_sha256"] == registered.weights_sha256

    # n answers, each its own sample; a seed makes them reproducible; content parts are text.
    sampled = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "n": 3,
               "max_tokens": 6, "temperature": 1.5, "seed": 7}
    first, again = serving.invoke(server.url, sampled), serving.invoke(server.url, sampled)
    assert first.status == 200, first.body
    choices = ChatCompletion.model_validate(first.body).choices
    assert [c.index for c in choices] == [0, 1, 2]
    assert [c.message.content for c in choices] == [c["message"]["content"] for c in again.body["choices"]]
    assert len({c.message.content for c in choices}) > 1  # three rows, three generators


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": "Hi"}], "stream": True}, "stream from the rlhf-vllm deployment target"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, "['tools'] are not supported"),
    ({"messages": [{"role": "user", "content": "Hi"}], "stop": ["."]}, "stop=['.'] is not supported"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens must be an integer in [1, 256]"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 100}, "n must be an integer in [1, 64]"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "the last message must be from 'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "['image_url'] parts"),
    ({"inputs": [["Hi"], ["There"]]}, "a list input must hold prompt strings, chats"),
    ({"inputs": []}, "no rows"),
])
def test_bad_chat_and_list_requests_get_a_400(server, body, message):
    result = _post(server, body)
    assert result.status == 400, (result.status, result.body)
    assert message in result.error_message, result.error_message


def test_concurrent_requests_share_a_generate_and_keep_their_own_answers(registered):
    """Rows of requests that arrive together are answered by one `generate`; each request gets the
    answers it gets alone (greedy, and seeded sampling: per-row generators), with its own max_new_tokens."""
    model = mlflow.pyfunc.load_model(registered.model_uri)
    policy = model.unwrap_python_model()
    requests = [(["Hi"], {"max_new_tokens": 4}),
                (["Describe a cafe.", "Name a colour."], {"max_new_tokens": 7, "temperature": 1.3, "seed": 5}),
                ([[{"role": "user", "content": "Count to three."}]], {"max_new_tokens": 2, "temperature": 0.8, "seed": 9}),
                (["Tell me about your weekend."], {"max_new_tokens": 6, "top_p": 0.5, "temperature": 1.0, "seed": 1})] * 3
    alone = [model.predict(p, params=q).to_dict("records") for p, q in requests[:4]] * 3

    calls, generate = [], policy.model.generate
    def counted(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)
    policy.model.generate = counted
    policy.batch_wait = 0.5  # hold the first batch open until every thread has queued
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: model.predict(r[0], params=r[1]).to_dict("records"), requests))
    finally:
        policy.model.generate = generate
    assert together == alone
    assert sum(calls) == sum(len(p) for p, _ in requests) and len(calls) < len(requests), calls
    assert max(calls) > 2  # rows of several requests in one generate
    assert [len(a) for a in together] == [len(p) for p, _ in requests]
    assert all(r["completion_tokens"] <= q["max_new_tokens"] for (_, q), a in zip(requests, together) for r in a)


def test_a_loaded_model_is_freed_when_dropped_and_its_batcher_ends(registered):
    """The batcher thread holds the model only while it answers: a model loaded once (as MLflow's
    input-example check at registration loads it) does not stay in memory."""
    before = set(threading.enumerate())
    model = mlflow.pyfunc.load_model(registered.model_uri)
    assert len(model.predict(["Hi"], params={"max_new_tokens": 2})) == 1
    [batcher] = [t for t in set(threading.enumerate()) - before if t.name == "rlhf-batcher"]
    policy = weakref.ref(model.unwrap_python_model())
    # MLflow itself keeps the last models-from-code instance it loaded (a module global that the next
    # load replaces): load another before dropping this one.
    other = mlflow.pyfunc.load_model(registered.model_uri)
    del model
    gc.collect()
    assert policy() is None
    batcher.join(timeout=10)
    assert not batcher.is_alive()
    assert len(other.predict(["Hi"], params={"max_new_tokens": 2})) == 1  # the other's batcher starts and serves


def _post(server, body: bytes | dict) -> serving.InvocationResult:
    return serving.invoke(server.url, body, timeout=60)


@pytest.mark.parametrize("body, message", [
    (b'{"dataframe_records": [{"prompt": "Hi"}', "Invalid input"),                    # malformed JSON
    (b"not json at all", "Invalid input"),
    ({"dataframe_records": [{"text": "Hi"}]}, "'prompt' (string) or 'messages'"),     # missing field
    ({"instances": [{"text": "Hi"}]}, "'prompt' (string) or 'messages'"),               # other request form
    ({"dataframe_records": [{"prompt": 42}]}, "prompt"),                               # wrong type
    ({"dataframe_records": [{"messages": "Hi"}]}, "messages"),                          # wrong type
    ({"dataframe_records": [{"messages": [{"role": "robot", "content": "Hi"}]}]}, "role must be one of"),
    ({"dataframe_records": [{"prompt": "x" * (1 << 20)}]}, "1048576 characters; this model accepts at most 32768"),
    ({"dataframe_records": [{"prompt": "Hi"}], "params": {"top_p": 0}}, "params.top_p must be"),
    ({"dataframe_records": [{"prompt": "Hi"}], "params": {"seed": "x"}}, "seed"),
])
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(server, body, message):
    result = _post(server, body)
    assert 400 <= result.status < 500, (result.status, result.body)
    assert message in result.error_message, result.error_message
    assert len(serving.predict(server.url, ["Hi"], {"max_new_tokens": 2})) == 1  # still serving


def test_check_registered_version(registered):
    client = MlflowClient()
    assert check_registered_version(client, MODEL_NAME, "champion", registered.version).ok
    moved = check_registered_version(client, MODEL_NAME, "champion", str(int(registered.version) + 1))
    assert not moved.ok and "expected" in moved.detail
    missing = check_registered_version(client, MODEL_NAME, "no-such-alias", registered.version)
    assert not missing.ok and "not found" in missing.detail


def test_server_that_cannot_load_fails_fast_with_its_log(mlflow_tracking, tmp_path):
    with pytest.raises(serving.ServingError, match=r"exited with code .* before becoming ready") as exc:
        with serving.ModelServer(f"models:/{MODEL_NAME}/999", startup_timeout=60, log_dir=tmp_path):
            pass
    assert "999" in str(exc.value)  # the log tail names the missing version


def test_stop_pid_stops_the_whole_group_of_a_detached_server():
    """How a server left running (`serving.keep_running`, `close(keep_running=True)`) is stopped later from
    its pid: the session leader and its children (uvicorn under the mlflow CLI) all go."""
    # Started through a short-lived intermediate process, like the flow step that exits after
    # starting the server: the leader is then not our child (our child's zombie would keep the group
    # "alive" until reaped).
    launcher = subprocess.run(
        [sys.executable, "-c",
         "import subprocess; print(subprocess.Popen(['bash', '-c', 'sleep 60 & wait'], start_new_session=True,"
         " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],  # else it holds our pipes open
        capture_output=True, text=True, check=True,
    )
    pid = int(launcher.stdout)
    start = time.monotonic()
    serving.stop_pid(pid, timeout=10)
    assert time.monotonic() - start < 5  # stopped by SIGTERM, not by the SIGKILL fallback
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    serving.stop_pid(pid)  # already gone: nothing to do


def test_stop_pid_refuses_a_process_it_did_not_start():
    other = subprocess.Popen(["sleep", "60"])  # shares our process group: not a ModelServer
    try:
        with pytest.raises(serving.ServingError, match="not the leader of its process group"):
            serving.stop_pid(other.pid)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_generate_dockerfile_builds_a_context_for_the_same_model(registered, tmp_path):
    """No Docker engine here: check what `mlflow models generate-dockerfile` writes for the registered
    version. The build context holds the same model (same adapter weights), and the image installs its
    pinned requirements and serves it on port 8080."""
    out = tmp_path / "docker"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m",
                           registered.model_uri, "-d", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    dockerfile = (out / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert f"pip install mlflow=={mlflow.__version__}" in dockerfile
    assert "COPY model_dir /opt/ml/model" in dockerfile and "_install_pyfunc_deps('/opt/ml/model'" in dockerfile
    assert dockerfile.rstrip().endswith("""ENTRYPOINT ["python", "-c", "from mlflow.models import container as C; C._serve('local')"]""")
    model_dir = out / "model_dir"
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "transformers", "peft"}
    # The same weights, and the context loads and answers as the image would.
    adapter = model_dir / "artifacts" / "adapter" / "adapter_model.safetensors"
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == registered.weights_sha256
    answer = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"prompt": ["Hi"]}),
                                                              params={"max_new_tokens": 3})
    assert answer["weights_sha256"].tolist() == [registered.weights_sha256]
