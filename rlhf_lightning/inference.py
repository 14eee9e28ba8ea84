"""Post-deployment checks: the served model is the registered one, and it answers the inference template.

Two kinds of evidence that the endpoint serves the checkpoint we registered:
- the registry: the alias the deploy step served points at the version it registered
  (:func:`check_registered_version`);
- the endpoint itself: every answer carries the sha256 of the adapter weights the server loaded, which
  must equal the hash computed from the trained adapter at registration (:func:`run_inference_template`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf_lightning.config import InferenceRequest
from rlhf_lightning.serving import invoke


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
    status: int
    latency_s: float
    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    weights_sha256: str | None = None
    error: str | None = None


@dataclass
class InferenceReport:
    """Answers to the inference template and the checks run on them."""

    url: str
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
    checks = [Check(f"{where}.http_200", answer.status == 200,
                    f"HTTP {answer.status}" + (f": {answer.error}" if answer.error else ""))]
    if answer.status != 200:
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


def run_inference_template(url: str, requests: list[InferenceRequest], expected_sha256: str,
                           timeout: float = 300.0) -> InferenceReport:
    """Send each request as `{"dataframe_records": [{"prompt"}], "params": {max_new_tokens, temperature}}`
    to `<url>/invocations` and check every answer: HTTP 200, a non-empty response, at most
    max_new_tokens generated, and the served weights' sha256 equal to `expected_sha256`."""
    report = InferenceReport(url=url, expected_sha256=expected_sha256)
    for i, req in enumerate(requests):
        payload = {"dataframe_records": [{"prompt": req.prompt}],
                   "params": {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature}}
        result = invoke(url, payload, timeout=timeout)
        answer = Answer(request=dataclasses.asdict(req), status=result.status, latency_s=result.latency_s)
        if result.status == 200:
            row = result.body["predictions"][0]
            answer.response = row["response"]
            answer.prompt_tokens = row["prompt_tokens"]
            answer.completion_tokens = row["completion_tokens"]
            answer.weights_sha256 = row["weights_sha256"]
        else:
            answer.error = result.error_message
        report.answers.append(answer)
        report.checks.extend(_check_answer(i, req, answer, expected_sha256))
    return report


def check_registered_version(client: MlflowClient, name: str, alias: str, expected_version: str) -> Check:
    """Does `name@alias` still point at `expected_version` (the version the deploy step served)? An
    alias can move between registration and serving, e.g. when another run promotes its model."""
    try:
        version = client.get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        return Check(f"alias.{alias}", False, f"{name}@{alias} not found: {exc.message}")
    return Check(f"alias.{alias}", str(version) == str(expected_version),
                 f"{name}@{alias} -> version {version}, expected {expected_version}")
