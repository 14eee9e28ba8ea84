"""Promote a registered version to `champion` by hand, with the checks the flow runs before it does.

    python -m rlhf_lightning promote --version 3 [--reason "..."] [--config configs/default.yaml]

The flow moves `champion` only when the evaluation gate promoted the candidate and the deployed candidate
passed the inference checks. A person may overrule the gate (tiny models always tie, so the tiny run never
makes a champion), but not the checks: the version is deployed through the same deployments target
(`serving.target`) under a temporary name, must serve exactly the registered weights and answer the
inference template (`serving.requests`), and only then does `champion` move, recorded as an automatic
promotion is (`champion.previous`, `champion.promoted_at`, `champion.reason`) plus `champion.promoted_by`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf_lightning.serving import inference as inf
from rlhf_lightning.serving import registry
from rlhf_lightning.config import ServingConfig
from rlhf_lightning.serving.deployments import LocalDeploymentClient, create_or_update, deployment_config, get_client
from rlhf_lightning.serving.registry import RegistryError
from rlhf_lightning.serving.server import ServingError


@dataclass
class Promotion:
    """What `promote_version` did."""

    name: str
    version: str
    previous: str | None
    """The champion it replaced (None: there was none)."""
    report: inf.InferenceReport


def promote_version(name: str, version: str, serving: ServingConfig, reason: str = "",
                    by: str = "the promote command") -> Promotion:
    """Deploy `name` version `version` to `serving.target` as `<name>-promote-check`, run the inference
    checks through that target's client, and move `champion` to it when every check passes; the check
    deployment is deleted either way. Raises RegistryError when the version does not exist or a check
    fails (the message lists the failed checks; `champion` is untouched)."""
    registry_client = MlflowClient()
    try:
        mv = registry_client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version} not found ({exc.message}); `mlflow models` lists the "
                            "registered versions, the MLflow UI's Models page too") from None
    expected = mv.tags.get("weights_sha256")
    if not expected:
        raise RegistryError(f"{name} version {version} has no weights_sha256 tag: it was not registered by "
                            "rlhf-lightning, so the served weights cannot be checked")
    uri, deployment = f"models:/{name}/{version}", f"{name}-promote-check"
    client = get_client(serving.target)
    local = isinstance(client, LocalDeploymentClient)
    try:
        try:  # updated when a promote that was killed left it behind
            create_or_update(client, deployment, uri, deployment_config(serving))
        except (MlflowException, ServingError) as exc:
            raise RegistryError(f"{name} v{version} could not be deployed to {serving.target}, champion not "
                                f"moved: {exc}") from None
        report = inf.serving_checks(client, deployment, uri, serving.requests, expected)
    finally:
        if local:
            client.close()
        try:
            client.delete_deployment(deployment)
        except MlflowException:
            pass  # never created: the create failed, and its error is on its way up
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        raise RegistryError(f"{name} v{version} failed the serving checks, champion not moved: {failed}")
    why = f"promoted by hand ({by})" + (f": {reason}" if reason else "")
    previous = registry.promote(name, str(version), why)
    registry_client.set_model_version_tag(name, str(version), "champion.promoted_by", by)
    return Promotion(name, str(version), previous, report)
