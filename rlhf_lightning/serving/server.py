"""Start, health-check and stop a real `mlflow models serve` process, and call its REST API.

The server is a child process (``python -m mlflow models serve --env-manager local``) in its own process
group, so stopping it also stops the uvicorn workers it forks. ``--env-manager local`` serves from the
current environment: the conda/virtualenv managers need network access these machines do not have,
and the pip requirements logged with the model are pinned to this environment anyway.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class ServingError(RuntimeError):
    """The model server failed to start, died, or answered a request with an error."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_problem(host: str, port: int) -> str | None:
    """Why `mlflow models serve` could not listen on host:port, found in a millisecond instead of after
    the model has loaded; None when it can (or port 0: the server picks one)."""
    if not port:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is in use (another server?): stop it, or pick another port "
                        "(--port N; 0 = a free one)")
            return f"cannot listen on {host}:{port}: {exc.strerror} (check the host and port)"
    return None


class ModelServer:
    """`mlflow models serve` of `model_uri` as a context manager.

    >>> with ModelServer("models:/rlhf-policy@champion") as server:
    ...     predict(server.url, ["Hello"], {"max_new_tokens": 8})

    A flow can also `start()` + `wait_ready()` in one step, hand `pid` and `url` to a later step, and
    stop the server there with :func:`stop_pid`. The server log goes to `log_path` (in `log_dir`).

    `env` adds to (and overrides) the child's environment. The child gets this process's MLflow
    tracking and registry URIs explicitly (they may have been set with `mlflow.set_tracking_uri`, which
    a child does not inherit), and never `MLFLOW_RUN_ID`: an inherited run id would make the server
    attach to, and possibly end, the caller's run.
    """

    def __init__(self, model_uri: str, host: str = "127.0.0.1", port: int = 0, env: dict[str, str] | None = None,
                 startup_timeout: float = 240.0, request_timeout: int = 120, log_dir: str | Path | None = None):
        self.model_uri = model_uri
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="mlflow-serve-"))
        self.log_path = log_dir / f"mlflow-serve-{self.port}.log"
        self._env = env or {}
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServingError("the server has not been started")
        return self._proc.pid

    def __enter__(self) -> ModelServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    label = "`mlflow models serve`"
    """How errors name this kind of server."""
    health_path = "/ping"
    """GET this until it answers 200: the server is ready."""

    def command(self) -> list[str]:
        """The server's command line (`start` runs it)."""
        # One worker: each uvicorn worker loads its own copy of the model, and the model already batches
        # concurrent requests itself (see pyfunc_model). `-t`: MLflow's 60 s default can cut long CPU
        # generations.
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "-h", self.host, "-p", str(self.port), "-t", str(self.request_timeout), "-w", "1"]

    def start(self) -> None:
        """Launch the server process (returns at once; `wait_ready` waits for it)."""
        if self._proc is not None:
            raise ServingError(f"server for {self.model_uri} already started (pid {self._proc.pid})")
        problem = port_problem(self.host, self.port)
        if problem:
            raise ServingError(problem)
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
               "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri(), **self._env}
        env.pop("MLFLOW_RUN_ID", None)
        # mlflow starts the server as `bash -c "exec uvicorn ..."`, found on PATH: put this interpreter's
        # bin dir first, or a venv used without activation (venv/bin/python ...) fails with code 127.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # The child keeps its own copy of the file descriptor; closing ours is fine.
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        """Poll GET /ping until it answers 200; fail fast with the log tail if the process exits."""
        if self._proc is None:
            raise ServingError("call start() before wait_ready()")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise ServingError(
                    f"{self.label} of {self.model_uri} exited with code {code} before becoming ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(0.5)
        raise ServingError(
            f"{self.label} of {self.model_uri} not ready on {self.url} after {self.startup_timeout:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, wait for every process in it to exit, SIGKILL the group
        if they have not after `timeout` s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            # Reap the CLI while waiting: its zombie would keep the group alive.
            _stop_group(proc.pid, timeout, reap=proc.poll)
            proc.wait()

    def serve_forever(self) -> None:
        """Block until Ctrl-C (then return) or until the server process exits (then raise)."""
        try:
            while self._proc is not None and self._proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            return
        raise ServingError(f"{self.label} of {self.model_uri} exited; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log written)"
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Stop a server that `ModelServer.start` launched, possibly in another process (an earlier flow
    step that left it running), from its `pid`: the same group shutdown as `ModelServer.stop`."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return  # already gone
    if pgid != pid:
        # ModelServer starts the server as a session leader (pgid == pid); anything else is not ours.
        raise ServingError(f"pid {pid} is not the leader of its process group; not a ModelServer process")
    _stop_group(pid, timeout)


def _stop_group(pgid: int, timeout: float, reap=None) -> None:
    # The whole group (start_new_session made pgid == pid): the mlflow CLI runs uvicorn as a child
    # process, and uvicorn outlives a CLI killed alone for a moment (it is told by PDEATHSIG).
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reap is not None:
            reap()
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    return True


@dataclass
class InvocationResult:
    """One POST /invocations: the HTTP status and the decoded JSON body (or raw text if not JSON)."""

    status: int
    body: Any
    latency_s: float

    @property
    def error_message(self) -> str:
        """The server's message for a failed request (MLflow answers `{"error_code", "message"}`)."""
        if isinstance(self.body, dict):
            return str(self.body.get("message", self.body))
        return str(self.body)


def request_error(status: int, message: str, where: str = "") -> Exception:
    """A failed request as the deployments clients raise it: the request's fault (HTTP 4xx) as an
    MlflowException with INVALID_PARAMETER_VALUE, the server's as a ServingError (`where` prefixes it)."""
    if 400 <= status < 500:
        return MlflowException(f"HTTP {status}: {message}", INVALID_PARAMETER_VALUE)
    return ServingError(f"{where}HTTP {status}: {message}")


def invoke(url: str, payload: dict | bytes, timeout: float = 300.0) -> InvocationResult:
    """POST `payload` as JSON (bytes: sent as they are) to `<url>/invocations`; HTTP errors are
    returned, not raised."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{url}/invocations", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    latency = time.perf_counter() - start
    text = raw.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = text
    return InvocationResult(status=status, body=body, latency_s=latency)


def predict(url: str, prompts: list[str] | list[list[dict]], params: dict[str, Any] | None = None,
            timeout: float = 300.0) -> list[dict]:
    """Answers of the served policy, one dict per prompt (`response`, `prompt_tokens`,
    `completion_tokens`, `finish_reason`, `weights_sha256`). `prompts`: plain strings, or chats (lists
    of {role, content}) — one kind per call. Raises ServingError with the server's message on failure."""
    records = [{"prompt": p} if isinstance(p, str) else {"messages": p} for p in prompts]
    return predict_records(url, records, params, timeout)


def predict_records(url: str, records: list[dict], params: dict[str, Any] | None = None,
                    timeout: float = 300.0) -> list[dict]:
    """`predict` for request rows as they are (`{"prompt"}` or `{"messages"}` each)."""
    payload: dict[str, Any] = {"dataframe_records": records}
    if params:
        payload["params"] = params
    result = invoke(url, payload, timeout=timeout)
    if result.status != 200:
        raise ServingError(f"POST {url}/invocations -> HTTP {result.status}: {result.error_message}")
    return result.body["predictions"]
