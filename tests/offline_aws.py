"""AWS Batch played offline: a moto server for S3 and Batch whose jobs run as a container would run them.

moto accepts Metaflow's job submissions but would start them with Docker, which these machines do not
have. `BatchEmulator` replaces only that last part: each submitted job's own command (`bash -c ...`, as
Metaflow wrote it) runs as a subprocess in a fresh working directory with a fresh HOME and nothing but

- the job's environment (the job definition's plus the submission's overrides, as Batch merges them),
- what the image sets: its `ENV` lines (read from the repository's Dockerfile) and its PATH, where this
  machine's venv stands in for the image's Python,
- credentials, which a container gets from its IAM role (dummy keys here).

So the job downloads its code package from (moto) S3, reads and writes artifacts there, and reaches
the MLflow server over HTTP, exactly as on Batch; nothing of the launching process leaks into it. Job
status, exit code and logs go back into moto, so Metaflow's runtime sees a real Batch job finish.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
BUCKET = "rlhf-metaflow"
QUEUE = "rlhf-gpu-queue"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_env(path: Path = REPO / "Dockerfile") -> dict[str, str]:
    """The `ENV KEY=VALUE ...` settings of the image (one or more pairs per line, no line continuations)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


class BatchEmulator:
    """A moto server (S3, Batch, IAM, EC2, logs, DynamoDB) on 127.0.0.1 whose Batch jobs run as local
    containers would. `env` holds what a user's Metaflow AWS configuration sets at launch."""

    def __init__(self, root: Path, extra_job_env: dict[str, str] | None = None, image_bin: Path | None = None):
        """`image_bin`: the bin directory of the Python environment that plays the image (default: this
        interpreter's, i.e. the project's venv)."""
        self.root = Path(root)
        self.image_bin = Path(image_bin or Path(sys.executable).parent)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.extra_job_env = extra_job_env or {}
        self.jobs: list[dict] = []  # one record per job run: name, env, cwd, home, exit code, log
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server = None
        self._original_run = None
        self._original_submit = None
        self.node_overrides: dict[str, dict] = {}  # a multi-node job's nodeOverrides by job id (moto drops them)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "BatchEmulator":
        from moto.batch import models as batch_models
        from moto.server import ThreadedMotoServer

        self._original_run = batch_models.Job.run
        emulator = self

        def run(job) -> None:  # replaces moto's Docker runner, in moto's own job thread
            emulator._run_job(job)

        batch_models.Job.run = run
        # SubmitJob's nodeOverrides (what each node of a multi-node job runs and asks for) never reach
        # moto's Job: keep them, by job id, as the request carried them.
        from moto.batch.responses import BatchResponse

        self._original_submit = original_submit = BatchResponse.submitjob

        def submitjob(response) -> str:
            body = original_submit(response)
            overrides = response._get_param("nodeOverrides")
            if overrides:
                emulator.node_overrides[json.loads(body)["jobId"]] = overrides
            return body

        BatchResponse.submitjob = submitjob
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self._server.start()
        self._create_resources()
        return self

    def __exit__(self, *exc) -> None:
        from moto.batch import models as batch_models

        from moto.batch.responses import BatchResponse

        self._server.stop()
        batch_models.Job.run = self._original_run
        BatchResponse.submitjob = self._original_submit

    @property
    def env(self) -> dict[str, str]:
        """The launcher's environment: what `metaflow configure aws` would write, pointed at moto."""
        return {
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint,
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
            "METAFLOW_DATATOOLS_S3ROOT": f"s3://{BUCKET}/data",
            "METAFLOW_BATCH_JOB_QUEUE": QUEUE,
            "METAFLOW_ECS_S3_ACCESS_IAM_ROLE": self.role_arn,
            # Step Functions (`step-functions create`): its role, the events role, the foreach table.
            "METAFLOW_SFN_IAM_ROLE": self.role_arn,
            "METAFLOW_EVENTS_SFN_ACCESS_IAM_ROLE": self.role_arn,
            "METAFLOW_SFN_DYNAMO_DB_TABLE": "metaflow-sfn",
        }

    # ------------------------------------------------------------------ AWS resources

    def _client(self, service: str):
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def _create_resources(self) -> None:
        self._client("s3").create_bucket(Bucket=BUCKET)
        self._client("dynamodb").create_table(
            TableName="metaflow-sfn", KeySchema=[{"AttributeName": "pathspec", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pathspec", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
        iam = self._client("iam")
        trust = '{"Version":"2012-10-17","Statement":[]}'
        self.role_arn = iam.create_role(RoleName="metaflow-batch", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        profile = iam.create_instance_profile(InstanceProfileName="metaflow-batch")["InstanceProfile"]["Arn"]
        ec2 = self._client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="batch", Description="batch", VpcId=vpc)["GroupId"]
        batch = self._client("batch")
        env_arn = batch.create_compute_environment(
            computeEnvironmentName="rlhf-gpu", type="MANAGED", state="ENABLED", serviceRole=self.role_arn,
            computeResources={"type": "EC2", "minvCpus": 0, "maxvCpus": 64, "desiredvCpus": 0,
                              "instanceTypes": ["g5.xlarge"], "subnets": [subnet], "securityGroupIds": [group],
                              "instanceRole": profile},
        )["computeEnvironmentArn"]
        batch.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                               computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env_arn}])

    # ------------------------------------------------------------------ the "container"

    def _container_env(self, job) -> dict[str, str]:
        job_env = {e["name"]: e["value"] for e in job._get_container_property("environment", [])}
        image = dockerfile_env()
        # The image's Python: this machine's venv plays it (its PATH first, as the image's ENV PATH does).
        path = os.pathsep.join([str(self.image_bin), "/usr/local/bin", "/usr/bin", "/bin"])
        return {**image, "PATH": path, **CREDENTIALS, **self.extra_job_env, **job_env}

    def _run_job(self, job) -> None:
        from moto.batch.models import JobStatus

        # The state machine as moto's Docker runner walks it: SUBMITTED -> ... -> RUNNING.
        job.advance()
        while job.status == JobStatus.SUBMITTED:
            time.sleep(0.2)
        if job.depends_on and not job._wait_for_dependencies():
            return
        for waiting in (JobStatus.PENDING, JobStatus.RUNNABLE, JobStatus.STARTING):
            job.advance()
            while job.status == waiting:
                time.sleep(0.2)
        job.job_started_at = datetime.now()
        job._start_attempt()
        if job.job_definition.type == "multinode":
            # Its nodes would be machines of their own talking to each other: nothing here runs them. The
            # job is recorded as submitted (definition and per-node overrides) and fails at once.
            deadline = time.time() + 10  # the overrides are kept once SubmitJob has answered
            while job.job_id not in self.node_overrides and time.time() < deadline:
                time.sleep(0.1)
            record = {"name": job.job_name, "multinode": True, "exit_code": 1,
                      "node_properties": job.job_definition.node_properties,
                      "node_overrides": self.node_overrides.get(job.job_id), "log": ""}
            with self._lock:
                self.jobs.append(record)
            job.exit_code = 1
            job._mark_stopped(success=False)
            return

        n = next(self._counter)
        box = Path(tempfile.mkdtemp(prefix=f"job{n:02d}-", dir=self.root))
        cwd, home = box / "cwd", box / "home"
        cwd.mkdir()
        home.mkdir()
        # What the Batch agent adds to every container.
        agent = {"AWS_BATCH_JOB_ATTEMPT": str(len(job.attempts)), "AWS_BATCH_CE_NAME": "rlhf-gpu",
                 "AWS_BATCH_JQ_NAME": QUEUE, "AWS_EXECUTION_ENV": "AWS_ECS_EC2"}
        env = {**self._container_env(job), **agent, "HOME": str(home)}
        command = job._add_parameters_to_command(job._get_container_property("command", []))
        log_path = box / "output.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            while proc.poll() is None:
                if job.stop:  # TerminateJob (Metaflow kills jobs of a failed run)
                    proc.kill()
                time.sleep(0.2)
        job.exit_code = proc.returncode
        text = log_path.read_text(errors="replace")
        resources = {r["type"]: r["value"] for r in job._get_container_property("resourceRequirements", [])}
        record = {"name": job.job_name, "env": env, "cwd": cwd, "home": home, "exit_code": proc.returncode,
                  "log": text, "command": command, "resources": resources}
        with self._lock:
            self.jobs.append(record)
        self._send_logs(job, text)
        job._mark_stopped(success=proc.returncode == 0 and not job.stop)

    def _send_logs(self, job, text: str) -> None:
        now = int(time.time() * 1000)
        events = [{"timestamp": now, "message": line} for line in text.splitlines() if line.strip()]
        job.log_stream_name = job._stream_name
        job._log_backend.ensure_log_group(job._log_group)
        job._log_backend.ensure_log_stream(job._log_group, job.log_stream_name)
        if events:
            job._log_backend.put_log_events(job._log_group, job.log_stream_name, events)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1: sqlite backend, artifacts proxied through the server (so a
    container that shares no disk with it can still log and download models)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = None

    def __enter__(self) -> "MlflowServer":
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.log = open(self.root / "server.log", "wb")
        self._proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 120 s")

    def __exit__(self, *exc) -> None:
        import signal

        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self.log.close()
