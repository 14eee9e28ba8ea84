"""A first hour with the registry: no champion yet (the tiny run never makes one), so `serve` of the
champion says what exists instead; `promote` makes one through the real serving checks and refuses a
version that fails them; `serve` checks its port before loading and stops its whole server on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from rlhf_lightning.serving import registry
from rlhf_lightning.serving import server as serving
from rlhf_lightning.config import from_dict

MODEL_NAME = "rlhf-policy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(registered_policy, mlflow_tracking) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """Greedy requests: a tiny random model sampling at 0.7 ends at once now and then (an empty answer
    would fail the non-empty check for a reason that has nothing to do with promotion)."""
    path = tmp_path_factory.mktemp("cfg") / "promote.yaml"
    path.write_text(yaml.safe_dump({"policy": {"model": "tiny:llama"}, "serving": {"startup_timeout": 120, "requests": [
        {"prompt": "Write a one-sentence review of a small seaside cafe.", "max_new_tokens": 6, "temperature": 0.0},
        {"prompt": "Describe a rainy Sunday afternoon in one sentence.", "max_new_tokens": 4, "temperature": 0.0}]}}))
    return path


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_lightning", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def champion() -> str | None:
    return registry.current_champion(MODEL_NAME)


def test_without_a_champion_serve_and_rollback_say_what_to_do(env):
    done = cli(env, "serve", "--model-uri", f"models:/{MODEL_NAME}@champion", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: models:/{MODEL_NAME}@champion: {MODEL_NAME} has no alias 'champion' (its aliases: candidate -> v1); "
        "serve one of those, or make a version champion: python -m rlhf_lightning promote --version N"]
    done = cli(env, "serve", "--model-uri", "models:/no-such-model@champion", timeout=60)
    assert done.returncode == 1 and "no registered model 'no-such-model'" in done.stderr
    done = cli(env, "rollback", "--model-name", MODEL_NAME, timeout=60)
    assert done.returncode == 1 and "promote --version N" in done.stderr


def test_promote_runs_the_serving_checks_then_moves_champion(env, config, registered_policy, tiny_policy):
    done = cli(env, "promote", "--version", registered_policy.version, "--reason", "tiny run, looked fine",
               "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"{MODEL_NAME}@champion: version (none) -> 1 (9 serving checks passed)" in done.stdout
    assert champion() == "1"
    tags = MlflowClient().get_model_version(MODEL_NAME, "1").tags
    assert tags["champion.reason"] == "promoted by hand (the promote command): tiny run, looked fine"
    assert tags["champion.promoted_by"] == "the promote command" and tags["champion.previous"] == ""
    assert "champion.promoted_at" in tags
    # The check deployment is gone from the registry's records.
    assert not [k for k in MlflowClient().get_registered_model(MODEL_NAME).tags if "promote-check" in k]

    # v2 claims weights it does not serve: the served hash differs, so the checks refuse it.
    cfg = from_dict({"policy": {"model": "tiny:llama"}})
    with mlflow.start_run() as run:
        v2 = registry.log_and_register(cfg, tiny_policy[1], tiny_policy[2], run.info.run_id, tags={})
    MlflowClient().set_model_version_tag(MODEL_NAME, v2.version, "weights_sha256", "0" * 64)
    done = cli(env, "promote", "--version", v2.version, "--config", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {MODEL_NAME} v2 failed the serving checks, champion not moved: " in done.stderr
    assert "weights_sha256_matches: served " in done.stderr
    assert champion() == "1"
    done = cli(env, "promote", "--version", "9", "--config", str(config), timeout=60)
    assert done.returncode == 1 and f"{MODEL_NAME} version 9 not found" in done.stderr


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_serve_checks_its_port_first_and_stops_its_server_on_sigterm(env):
    if champion() is None:
        registry.promote(MODEL_NAME, "1", "test")
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}"
    first = subprocess.Popen([sys.executable, "-m", "rlhf_lightning", "serve", "--port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not answers(url):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.5)
        busy = cli(env, "serve", "--port", str(port), timeout=60)
        assert busy.returncode == 1 and "Traceback" not in busy.stderr
        # This message comes from the check before the server process starts: no model was loaded.
        assert busy.stderr.strip().splitlines() == [(
            f"error: port {port} on 127.0.0.1 is in use (another server?): stop it, or pick another port "
            "(--port N; 0 = a free one)")]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert out.strip().splitlines()[-1] == "stopped"
        assert not answers(url)  # no uvicorn left behind on the port
    finally:
        if first.poll() is None:
            first.kill()
