"""Post-deployment checks: the served model is the registered one, and it answers the inference template.

Everything goes through the MLflow deployments client of the target the version was deployed to
(`mlflow.deployments.get_deploy_client`), so the same checks run against the project's local target, SageMaker
or any other. Three kinds of evidence that the deployment serves the checkpoint we registered:
- the registry: the alias the deploy step deployed points at the version it registered
  (:func:`check_registered_version`);
- the target: the deployment exists and, where the target says, serves that version (:func:`check_deployment`);
- the endpoint itself: every answer carries the sha256 of the adapter weights the server loaded, which
  must equal the hash computed from the trained adapter at registration (:func:`run_inference_template`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.deployments import BaseDeploymentClient
from mlflow.exceptions import MlflowException

from rlhf_lightning.config import InferenceRequest
from rlhf_lightning.serving.server import ServingError


@dataclass
class Check:
    """One pass/fail check with what was seen."""

    name: str
    ok: bool
    detail: str


@dataclass
class Answer:
    """The endpoint's answer to one inference-template request."""

    request: dict[str, Any]
    latency_s: float
    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    weights_sha256: str | None = None
    error: str | None = None


@dataclass
class InferenceReport:
    """Answers to the inference template and the checks run on them."""

    deployment: str
    expected_sha256: str
    answers: list[Answer] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _check_answer(i: int, req: InferenceRequest, answer: Answer, expected_sha256: str) -> list[Check]:
    where = f"request[{i}]"
    checks = [Check(f"{where}.answered", answer.error is None,
                    "answered" if answer.error is None else answer.error)]
    if answer.error is not None:
        return checks  # no body to check
    checks += [
        Check(f"{where}.response_non_empty", bool(answer.response and answer.response.strip()),
              f"response {answer.response!r}"),
        Check(f"{where}.completion_tokens_within_limit",
              answer.completion_tokens is not None and 0 < answer.completion_tokens <= req.max_new_tokens,
              f"completion_tokens={answer.completion_tokens}, max_new_tokens={req.max_new_tokens}"),
        Check(f"{where}.weights_sha256_matches", answer.weights_sha256 == expected_sha256,
              f"served {answer.weights_sha256}, registered {expected_sha256}"),
    ]
    return checks


def run_inference_template(client: BaseDeploymentClient, deployment: str, requests: list[InferenceRequest],
                           expected_sha256: str) -> InferenceReport:
    """Send each request to `deployment` through its MLflow deployments client (`client.predict` with
    one row `{"prompt"}` and params `{max_new_tokens, temperature}`) and check every answer: answered,
    a non-empty response, at most max_new_tokens generated, and the served weights' sha256 equal to
    `expected_sha256`. The same code checks a local server, SageMaker or any other target."""
    report = InferenceReport(deployment=deployment, expected_sha256=expected_sha256)
    for i, req in enumerate(requests):
        params = {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature}
        start = time.perf_counter()
        answer = Answer(request=dataclasses.asdict(req), latency_s=0.0)
        try:
            out = client.predict(deployment, pd.DataFrame([{"prompt": req.prompt}]), params=params)
            row = out["predictions"][0]
            answer.response = row["response"]
            answer.prompt_tokens = row["prompt_tokens"]
            answer.completion_tokens = row["completion_tokens"]
            answer.weights_sha256 = row["weights_sha256"]
        except (MlflowException, ServingError) as exc:  # the target rejected or failed the request
            answer.error = str(exc)
        answer.latency_s = time.perf_counter() - start
        report.answers.append(answer)
        report.checks.extend(_check_answer(i, req, answer, expected_sha256))
    return report


def check_deployment(client: BaseDeploymentClient, deployment: str, expected_model_uri: str) -> Check:
    """Does the target hold `deployment`, and (where the target reports it, as rlhf-local does) does it
    serve `expected_model_uri`?"""
    try:
        record = client.get_deployment(deployment)
    except MlflowException as exc:
        return Check("deployment.exists", False, f"{deployment}: {exc.message}")
    served = record.get("model_uri")
    if served is None:  # e.g. SageMaker describes the endpoint, not the model; the answers' hashes tell
        return Check("deployment.exists", True, f"{deployment}: {record.get('EndpointStatus', 'exists')}")
    return Check("deployment.model_uri", served == expected_model_uri,
                 f"{deployment} serves {served}, expected {expected_model_uri}")


def check_registered_version(client: MlflowClient, name: str, alias: str, expected_version: str) -> Check:
    """Does `name@alias` still point at `expected_version` (the version the deploy step served)? An
    alias can move between registration and serving, e.g. when another run promotes its model."""
    try:
        version = client.get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        return Check(f"alias.{alias}", False, f"{name}@{alias} not found: {exc.message}")
    return Check(f"alias.{alias}", str(version) == str(expected_version),
                 f"{name}@{alias} -> version {version}, expected {expected_version}")


def serving_checks(client: BaseDeploymentClient, deployment: str, model_uri: str, requests: list[InferenceRequest],
                   expected_sha256: str, alias: tuple[str, str, str] | None = None) -> InferenceReport:
    """Every check a version passes before `champion` may point at it, as the flow's inference stage and
    the promote command both run them: `alias` = (name, alias, version) still names the deployed version,
    the deployment serves `model_uri`, and the inference template is answered with the registered weights."""
    report = run_inference_template(client, deployment, requests, expected_sha256)
    first = [check_registered_version(MlflowClient(), *alias)] if alias else []
    report.checks[:0] = first + [check_deployment(client, deployment, model_uri)]
    return report
