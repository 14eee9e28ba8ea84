"""One function per pipeline stage: open the stage's MLflow run, call the library, record the result.

The Metaflow flow (flows/rlhf.py) calls these and stores what they return as artifacts; the CLI
(`python -m rlhf_lightning`) and tests call them without Metaflow. Models cross step boundaries as
`ModelBundle`s (a tar of the directory) because on AWS Batch each step runs on another machine.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_lightning import tracking
from rlhf_lightning.config import RLHFConfig

if TYPE_CHECKING:  # torch and Lightning stay out of the light steps (start, join, end)
    from rlhf_lightning.checkpoints import CheckpointPlan


@dataclass
class ModelBundle:
    """A model directory packed for a Metaflow artifact, plus what the producing stage measured."""

    tar: bytes
    metrics: dict[str, Any]
    mlflow_run_id: str
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pack(cls, directory: str, **kwargs: Any) -> "ModelBundle":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(directory, arcname=".")
        return cls(tar=buf.getvalue(), **kwargs)

    def extract(self, directory: str) -> str:
        """Unpack into `directory` (reused if already unpacked there) and return it."""
        path = Path(directory)
        if not path.is_dir() or not any(path.iterdir()):
            path.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(self.tar)) as tar:
                tar.extractall(path, filter="data")
        return str(path)


def _card_markdown(card, text: str) -> None:
    if card is not None:
        from metaflow.cards import Markdown

        card.append(Markdown(text))


def _card_figure(card, fig) -> None:
    if card is not None:
        from metaflow.cards import Image

        card.append(Image.from_matplotlib(fig))


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return "| metric | value |\n|---|---|\n" + rows


def _checkpointing(cfg: RLHFConfig, plan: CheckpointPlan | None, workdir: str, stage: str, every_n: int,
                   fingerprint: str, run_id: str):
    """The stage's checkpoint callback and the checkpoint it resumes from (recorded on its run). Without
    a plan (the CLI, tests) checkpoints go to `workdir/checkpoints` and nothing is resumed."""
    import mlflow

    from rlhf_lightning import checkpoints

    local = os.path.join(workdir, "checkpoints")
    callback, resumed = checkpoints.checkpointing(plan or checkpoints.CheckpointPlan(save_to=local), local_dir=local,
                                                  every_n_batches=every_n, keep_last=cfg.faults.keep_last,
                                                  fingerprint=fingerprint, mlflow_run_id=run_id)
    if resumed is not None:
        mlflow.set_tags({"resumed_from": f"{resumed.source}/{os.path.basename(resumed.path)}",
                         "resumed_at_batch": str(resumed.batches),
                         "resumed_from_mlflow_run": str(resumed.mlflow_run_id)})
        print(f"{stage}: resuming from the checkpoint {resumed.source}/{os.path.basename(resumed.path)} "
              f"({resumed.batches} batches done)", flush=True)
    return callback, resumed


# ---------------------------------------------------------------- stages


def start(cfg: RLHFConfig, *, flow_name: str, run_id: str, remote_steps: list[str] = ()) -> str:
    """Create the MLflow parent run; return its id. Raises `ConfigError` first when `remote_steps` run
    on other machines but tracking points at this machine's disk."""
    tracking.require_shared_tracking(remote_steps)
    parent = tracking.start_parent_run(cfg, flow_name=flow_name, run_id=run_id)
    print(f"MLflow: tracking {tracking.tracking_uri()}, parent run {parent}")
    return parent


Shard = tuple[int, int]  # (index, count) of one sampling task


def sampling_shards(cfg: RLHFConfig) -> list[Shard | None]:
    """What the flow's sampling tasks do (its foreach list): one (index, count) shard per
    `data.builtin.sampling_workers` when the built-in task must be sampled; [None] (one task with nothing
    to do: a foreach cannot be empty) when the config names its own data or the task's files are cached."""
    if cfg.data.preferences:
        return [None]
    from rlhf_lightning.data import builtin

    if builtin.cached_task(cfg.data.builtin, cfg.policy):
        return [None]
    count = cfg.data.builtin.sampling_workers
    return [(index, count) for index in range(count)]


def sample_builtin_task(cfg: RLHFConfig, shard: Shard | None) -> dict[tuple[int, int], list[str]]:
    """One shard's responses of the built-in task (`builtin.sample_shard`); {} for None."""
    if shard is None:
        return {}
    from rlhf_lightning.data import builtin

    return builtin.sample_shard(cfg.data.builtin, cfg.policy, *shard)


def preprocess(cfg: RLHFConfig, parent_run_id: str, workdir: str,
               responses: dict[tuple[int, int], list[str]] | None = None):
    """Read, clean, template, truncate and split every source; with `responses` (every shard's, joined),
    first write the built-in task's files from them."""
    from rlhf_lightning.data import preprocess as pre

    with tracking.stage_run(parent_run_id, "preprocess"):
        if responses:
            from rlhf_lightning.data import builtin

            builtin.write_task(cfg.data.builtin, cfg.policy, responses)
            tracking.log_metrics({"builtin/sampling_workers": cfg.data.builtin.sampling_workers})
        data = pre.preprocess(cfg, workdir)
        for name, path in data.files.items():
            rows = getattr(data, name)
            tracking.log_rows_dataset(rows, path=path, name=name, context="training" if "train" in name or name == "rl_prompts" else "evaluation")
        tracking.log_dict_artifact(data.counts, "preprocess/counts.json")
        tracking.log_metrics({f"rows/{k}": len(getattr(data, k)) for k in ("pref_train", "pref_eval", "rl_prompts", "eval_prompts")})
    return data


def validate(cfg: RLHFConfig, parent_run_id: str, data, workdir: str, card=None):
    """Check every row; raise `DataValidationError` (stopping the run before any training) on errors."""
    from rlhf_lightning.data import validate as val

    with tracking.stage_run(parent_run_id, "validate"):
        report = val.validate(data, cfg)
        path = report.write_json(os.path.join(workdir, "validation_report.json"))
        print(val.summary(report, path))  # the console says what `validate` says, warnings included
        import mlflow

        mlflow.log_artifact(path, "validation")
        tracking.log_metrics({"validation/errors": len(report.errors), "validation/warnings": len(report.warnings),
                              **{f"validation/errors/{k}": v for k, v in report.stats["errors_by_kind"].items()},
                              **{f"validation/warnings/{k}": v for k, v in report.stats["warnings_by_kind"].items()}})
        fig = report.histogram_figure()
        tracking.log_figure(fig, "validation/lengths.png")
        _card_markdown(card, "# Validation report\n\n" + report.markdown()
                       + f"\n\nFull report (every problem): `{path}`, MLflow artifact `validation/validation_report.json`")
        _card_figure(card, fig)
        report.raise_if_errors(path)
    return report.to_dict()


def train_reward_model(cfg: RLHFConfig, parent_run_id: str, data, workdir: str, card=None,
                       checkpoints: CheckpointPlan | None = None) -> ModelBundle:
    """Train and measure the reward model; raise `evaluation.GateError` (stopping the run before RL) when
    its held-out accuracy is below `reward_model.min_eval_accuracy`. `checkpoints`: where to save
    checkpoints and look for one to resume from."""
    from rlhf_lightning import checkpoints as ckpt
    from rlhf_lightning import evaluation
    from rlhf_lightning.config import to_dict
    from rlhf_lightning.models import reward_model as rm

    with tracking.stage_run(parent_run_id, "train_reward_model") as run:
        fingerprint = ckpt.fingerprint(to_dict(cfg.reward_model), rm.resolve_backbone(cfg), data.digests())
        callback, resumed = _checkpointing(cfg, checkpoints, workdir, "reward model",
                                           cfg.faults.checkpoint_every_n_steps, fingerprint, run.info.run_id)
        if resumed is not None and resumed.mlflow_run_id:
            # The training curve up to the checkpoint, from the attempt that wrote it.
            tracking.copy_metric_history(resumed.mlflow_run_id, run.info.run_id, below_step=resumed.batches)
        logger = tracking.lightning_logger(run.info.run_id)
        result = rm.train_reward_model(cfg, data.pref_train, data.pref_eval, workdir, logger=logger,
                                       callbacks=[callback], ckpt_path=resumed and resumed.path)
        metrics = {f"reward_model/{k}": v for k, v in result.metrics.items()}
        # At the fit's last step: the final figures are the latest values of the curves Lightning logged
        # under the same names (a metric's latest value is the one at its highest step).
        tracking.log_metrics(metrics, step=result.steps)
        import mlflow

        mlflow.log_artifacts(result.model_dir, "reward_model")
        _card_markdown(card, "# Reward model\n\n" + _metrics_table(metrics))
        # Gate before RL: recorded, then raised, so the stage run is FAILED and the flow stops here.
        threshold = cfg.reward_model.min_eval_accuracy
        passed = result.metrics["eval_accuracy"] >= threshold
        mlflow.set_tags({"gate.reward_model": "passed" if passed else "failed",
                         "gate.reward_model.min_eval_accuracy": str(threshold)})
        _card_markdown(card, f"**Gate:** held-out accuracy {result.metrics['eval_accuracy']:.3f} "
                             f"± {result.metrics['eval_accuracy_ci95']:.3f} (95%, clustered by prompt) "
                             f"{'>=' if passed else '<'} reward_model.min_eval_accuracy {threshold:.3f}")
        try:
            evaluation.check_reward_model(result.metrics, threshold, len(data.pref_eval))
        except evaluation.GateError as exc:
            # The run ends here (whoever drives the stages, the flow or the CLI).
            tracking.fail_parent(parent_run_id, step="train_reward_model", reason=str(exc), expected=True)
            raise
    print(f"reward model: held-out accuracy {result.metrics['eval_accuracy']:.3f} ± {result.metrics['eval_accuracy_ci95']:.3f} "
          f"on {len(data.pref_eval)} pairs")
    return ModelBundle.pack(result.model_dir, metrics=metrics, mlflow_run_id=run.info.run_id,
                            extras={"reward_mean": result.reward_mean, "reward_std": result.reward_std})


def prepare_prompts(cfg: RLHFConfig, parent_run_id: str, data) -> dict[str, list[dict]]:
    with tracking.stage_run(parent_run_id, "prepare_prompts"):
        tracking.log_metrics({"prompts/rl": len(data.rl_prompts), "prompts/eval": len(data.eval_prompts)})
        tracking.log_dict_artifact(
            {"rl_prompts": data.rl_prompts[:20], "eval_prompts": data.eval_prompts[:20]}, "prompts/sample.json"
        )
    return {"rl": data.rl_prompts, "eval": data.eval_prompts}


def reinforce(cfg: RLHFConfig, parent_run_id: str, prompts: dict, reward_model: ModelBundle, workdir: str,
              card=None, checkpoints: CheckpointPlan | None = None) -> ModelBundle:
    """PPO; logs the per-iteration history, training curves and the over-optimisation plot.
    `checkpoints`: where to save checkpoints and look for one to resume from (a resumed run continues
    the iterations, metrics and history of the checkpoint)."""
    import hashlib

    from rlhf_lightning import checkpoints as ckpt
    from rlhf_lightning import evaluation
    from rlhf_lightning.config import to_dict
    from rlhf_lightning.models import ppo

    rm_dir = reward_model.extract(os.path.join(workdir, "reward_model"))
    gold = evaluation.has_gold_judge(cfg)
    # The monitor's prompts are the first held-out prompts: never trained on, cheap to sample.
    callbacks = ([evaluation.HeldoutMonitor(prompts["eval"], cfg.evaluation, gold)]
                 if cfg.evaluation.every_n_iterations > 0 else [])
    with tracking.stage_run(parent_run_id, "reinforce") as run:
        fingerprint = ckpt.fingerprint(to_dict(cfg.policy), to_dict(cfg.ppo), prompts["rl"],
                                       hashlib.sha256(reward_model.tar).hexdigest())
        callback, resumed = _checkpointing(cfg, checkpoints, workdir, "PPO", cfg.faults.checkpoint_every_n_iterations,
                                           fingerprint, run.info.run_id)
        logger = tracking.lightning_logger(run.info.run_id)
        result = ppo.train_ppo(cfg, prompts["rl"], rm_dir, workdir, logger=logger, gold_judge=gold,
                               callbacks=[*callbacks, callback], ckpt_path=resumed and resumed.path)
        import mlflow

        mlflow.log_artifacts(result.adapter_dir, "adapter")
        tracking.log_dict_artifact(result.history, "ppo/history.json")
        fig = _history_figure(result.history)
        tracking.log_figure(fig, "ppo/training_curves.png")
        overopt = evaluation.overoptimisation_figure(result.history)
        tracking.log_figure(overopt, "ppo/overoptimisation.png")
        _card_markdown(card, "# PPO\n\n" + _metrics_table(result.metrics) + "\n\n" + PPO_KL_NOTE)
        _card_figure(card, overopt)
        _card_figure(card, fig)
    return ModelBundle.pack(result.adapter_dir, metrics=result.metrics, mlflow_run_id=run.info.run_id,
                            extras={"history": result.history})


PPO_KL_NOTE = (
    "`ppo/kl` is KL(policy ‖ reference) in nats per sequence, estimated from each iteration's rollouts as "
    "the sum over their tokens of log π(token) − log π_ref(token). The estimate is unbiased but noisy: while "
    "the two models are close, and with few rollouts, one batch can read below zero. The evaluate stage "
    "measures the KL on held-out prompts with more samples.")


def _history_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("ppo/reward", "ppo/kl", "ppo/kl_coef", "ppo/value_loss", "ppo/clip_fraction",
                        "ppo/approx_kl", "ppo/entropy", "ppo/response_length", "ppo/eos_rate")
            if history and k in history[0]]
    cols = min(len(keys), 5)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        ax.plot([h[key] for h in history])
        ax.set_title(key + (" (estimate; can dip below 0)" if key == "ppo/kl" else ""), fontsize=9)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return fig


def _current_champion(cfg: RLHFConfig, workdir: str) -> tuple[tuple[str, str] | None, str]:
    """((adapter dir, label), note) of the registry's `champion`, with only its adapter downloaded; None
    and the reason when there is none to compare with (none yet, or trained on another base model)."""
    import mlflow
    from mlflow import MlflowClient

    from rlhf_lightning.registry import CHAMPION_ALIAS

    name = cfg.registry.model_name
    client = MlflowClient()
    models = client.search_registered_models(filter_string=f"name = '{name}'")
    version = models[0].aliases.get(CHAMPION_ALIAS) if models else None
    if version is None:
        return None, f"no {name}@{CHAMPION_ALIAS} registered yet"
    base = client.get_model_version(name, version).tags.get("base_model")
    if base != cfg.policy.model:
        return None, f"{name}@{CHAMPION_ALIAS} is v{version} on base {base!r}, not {cfg.policy.model!r}: not comparable"
    adapter = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts/adapter",
                                                  dst_path=os.path.join(workdir, f"champion-v{version}"))
    return (adapter, f"v{version}"), f"compared with {name}@{CHAMPION_ALIAS} (v{version})"


def evaluate(cfg: RLHFConfig, parent_run_id: str, prompts: dict, reward_model: ModelBundle, policy: ModelBundle,
             workdir: str, card=None) -> dict[str, Any]:
    """Policy vs reference (and vs the current champion) on the held-out prompts, and the promotion gate.
    The decision and the numbers behind it are recorded on the evaluate run (metrics + `gate.*` tags)."""
    from rlhf_lightning import evaluation

    rm_dir = reward_model.extract(os.path.join(workdir, "reward_model"))
    adapter_dir = policy.extract(os.path.join(workdir, "adapter"))
    with tracking.stage_run(parent_run_id, "evaluate") as run:
        champion, champion_note = (_current_champion(cfg, workdir) if cfg.evaluation.compare_champion
                                   else (None, "champion comparison off (evaluation.compare_champion)"))
        result = evaluation.evaluate(cfg, prompts["eval"], adapter_dir, rm_dir, champion=champion)
        metrics = {**result.metrics, "reward_model/eval_accuracy": reward_model.metrics["reward_model/eval_accuracy"],
                   "gate/promote": float(result.promote), "gate/threshold": 0.5 + cfg.evaluation.promotion_margin}
        tracking.log_metrics(metrics)
        tracking.log_dict_artifact(result.samples, "evaluation/samples.json")
        import mlflow
        import pandas as pd

        shown = evaluation.side_by_side(result.samples)
        mlflow.log_table(pd.DataFrame(shown), "evaluation/side_by_side.json")  # a table in the MLflow UI
        mlflow.set_tags({"gate.promote": str(result.promote), "gate.reason": result.reason,
                         "gate.champion": champion_note})
        _card_markdown(card, f"# Evaluation\n\n**Gate:** {result.reason}\n\nChampion: {champion_note}\n\n"
                             "## What the policy says, beside the reference\n\nThe held-out answers the policy "
                             "improved most and least, then a few as they came (all of them: MLflow artifact "
                             f"`evaluation/samples.json`).\n\n{evaluation.side_by_side_markdown(shown)}\n\n"
                             f"## Figures\n\n{_metrics_table(metrics)}")
    print(f"evaluation: {result.reason} ({champion_note})")
    return {"metrics": metrics, "promote": result.promote, "reason": result.reason, "champion": champion_note,
            "mlflow_run_id": run.info.run_id}


def lineage_tags(parent_run_id: str, data, reward_model: ModelBundle, policy: ModelBundle, evaluation: dict,
                 metaflow: dict[str, str] | None = None) -> dict[str, str]:
    """What a registered version came from, as Model Registry tags: the Metaflow run, the MLflow runs of
    the stages that made it, the data (sha256 of each canonical split + the input files), the evaluation
    figures and the gate decision."""
    import json

    tags = {
        "lineage.mlflow_parent_run_id": parent_run_id,
        "lineage.reward_model_run_id": reward_model.mlflow_run_id,
        "lineage.ppo_run_id": policy.mlflow_run_id,
        "lineage.evaluate_run_id": evaluation["mlflow_run_id"],
        **{f"lineage.data.{k}_sha256": v for k, v in data.digests().items()},
        # The built-in task has no input files: its generated files are the sources then.
        "lineage.data.sources": json.dumps(data.sources)[:4900],  # tag values are capped at 5000 chars
        "gate.promote": str(evaluation["promote"]),
        "gate.reason": evaluation["reason"],
        "gate.champion": evaluation["champion"],
        **{f"eval.{k.split('/', 1)[-1] if k.startswith('eval/') else k}": f"{v:.4f}"
           for k, v in evaluation["metrics"].items()},
    }
    for key, value in (metaflow or {}).items():
        tags[f"lineage.metaflow.{key}"] = value
    return tags


def register(cfg: RLHFConfig, parent_run_id: str, policy: ModelBundle, workdir: str, lineage: dict[str, str]):
    """Log and register the policy with its `lineage` tags; alias `candidate` only (see `inference`)."""
    from rlhf_lightning import registry
    from rlhf_lightning.models.loading import base_model_dir

    adapter_dir = policy.extract(os.path.join(workdir, "adapter"))
    with tracking.stage_run(parent_run_id, "register") as run:
        info = registry.log_and_register(cfg, adapter_dir, base_model_dir(cfg.policy.model, workdir),
                                         run.info.run_id, tags=lineage)
        import mlflow

        mlflow.set_tags({"model.name": info.name, "model.version": info.version})
    print(f"registered {info.name} version {info.version} aliases {info.aliases}")
    return info


def deployment_name(cfg: RLHFConfig) -> str:
    return cfg.serving.deployment_name or f"{cfg.registry.model_name}-candidate"


def _target_config(cfg: RLHFConfig) -> dict[str, Any]:
    from rlhf_lightning.deployments import TARGET

    local = ({"host": cfg.serving.host, "port": cfg.serving.port, "startup_timeout": cfg.serving.startup_timeout}
             if cfg.serving.target == TARGET else {})
    return {**local, **cfg.serving.target_config}


def deploy(cfg: RLHFConfig, parent_run_id: str, model_version) -> dict[str, Any]:
    """Deploy the new candidate's version through MLflow's deployments API to `serving.target` (create
    the deployment, or update it to this version). Returns what `inference` needs to reach it again
    through the same client, wherever that step runs: no URL, port or process id."""
    from mlflow.exceptions import MlflowException

    from rlhf_lightning import registry
    from rlhf_lightning.deployments import get_client

    name = deployment_name(cfg)
    uri = f"models:/{model_version.name}/{model_version.version}"
    with tracking.stage_run(parent_run_id, "deploy"):
        client = get_client(cfg.serving.target)
        try:
            client.get_deployment(name)
            exists = True
        except MlflowException:
            exists = False
        if exists:
            client.update_deployment(name, model_uri=uri, config=_target_config(cfg))
        else:
            client.create_deployment(name, uri, config=_target_config(cfg))
        import mlflow

        endpoint = {"target": cfg.serving.target, "name": name, "model_uri": uri,
                    "alias": registry.CANDIDATE_ALIAS, "version": model_version.version}
        mlflow.set_tags({f"deployment.{k}": str(v) for k, v in endpoint.items()})
    print(f"deployed {uri} to {cfg.serving.target} as {name!r} ({'updated' if exists else 'created'})")
    return endpoint


def inference(cfg: RLHFConfig, parent_run_id: str, model_version, endpoint: dict, evaluation: dict,
              card=None) -> tuple[dict[str, Any], Any]:
    """Check, through the deployments client of the target `deploy` used, that the deployment serves the
    registered version and weights and answers the inference template; only then, if the evaluation
    gate said so, move `champion` to this version. A server this step started (rlhf-local) is stopped
    unless `serving.keep_running`. Returns (the report, the version's info with its aliases now)."""
    import dataclasses

    from mlflow import MlflowClient

    from rlhf_lightning import inference as inf
    from rlhf_lightning import registry
    from rlhf_lightning.deployments import LocalDeploymentClient, get_client

    client = get_client(endpoint["target"])
    local = isinstance(client, LocalDeploymentClient)  # rlhf-local: a server this process starts and stops
    try:
        with tracking.stage_run(parent_run_id, "inference"):
            import mlflow

            if local:
                client.serve(endpoint["name"])  # start it first: the latencies are the requests' own
            report = inf.run_inference_template(client, endpoint["name"], cfg.serving.requests,
                                                model_version.weights_sha256)
            # The checkpoint checks: the alias still names the version deploy deployed, the target serves
            # that version, and the served weights hash (in every answer) equals the registered adapter's.
            report.checks[:0] = [inf.check_registered_version(MlflowClient(), model_version.name,
                                                              endpoint["alias"], endpoint["version"]),
                                 inf.check_deployment(client, endpoint["name"], endpoint["model_uri"])]
            data = report.to_dict()
            tracking.log_dict_artifact(data, "inference/report.json")
            tracking.log_metrics({"inference/ok": float(report.ok),
                                  "inference/latency_s": max(a.latency_s for a in report.answers)})
            lines = [f"| {a.request['prompt'][:60]} | {(a.response or a.error or '')[:120]} |" for a in report.answers]
            _card_markdown(card, "# Inference template\n\n| prompt | response |\n|---|---|\n" + "\n".join(lines))
            if not report.ok:
                failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
                mlflow.set_tag("champion.decision", "not promoted: the deployed candidate failed its checks")
                raise RuntimeError(f"inference checks failed, champion not moved: {failed}")
            if evaluation["promote"]:
                previous = registry.promote(model_version.name, model_version.version, evaluation["reason"])
                decision = (f"promoted v{model_version.version} to champion"
                            + (f" (replacing v{previous})" if previous else ""))
            else:
                decision = f"champion not moved: {evaluation['reason']}"
            mlflow.set_tag("champion.decision", decision)
            _card_markdown(card, f"**Champion:** {decision}")
            print(decision)
    finally:
        left = client.close(keep_running=cfg.serving.keep_running) if local else {}
    data["endpoint"] = left.get(endpoint["name"])  # {url, pid} of a server left running here, else None
    if data["endpoint"]:
        print(f"endpoint left running at {data['endpoint']['url']} (pid {data['endpoint']['pid']})")
    aliases = sorted(MlflowClient().get_model_version(model_version.name, model_version.version).aliases)
    return data, dataclasses.replace(model_version, aliases=aliases)


HEADLINE = ("eval/gold_win_rate", "eval/gold_win_rate_ci95", "eval/rm_win_rate", "eval/rm_win_rate_ci95", "eval/kl",
            "eval/kl_per_token", "eval/gold_score", "eval/ref_gold_score", "gate/promote")


def end(parent_run_id: str, model_version, evaluation: dict, reward_model: ModelBundle | None = None,
        flow: str = "flows/rlhf.py", run_id: str | None = None) -> None:
    """Put the headline on the parent run (metrics, the version and the gate's decision, a description
    that says what happened and links the version), close it, and print what to open next."""
    import mlflow

    m = evaluation["metrics"]
    headline = {k: v for k, v in m.items() if k in HEADLINE}
    if reward_model is not None:
        headline |= {k: v for k, v in reward_model.metrics.items()
                     if k in ("reward_model/eval_accuracy", "reward_model/eval_accuracy_ci95")}
    name, version = model_version.name, model_version.version
    champion = "champion" in model_version.aliases

    def figure(key: str, digits: int = 3) -> str:
        value, ci = m.get(key), m.get(f"{key}_ci95")
        return "n/a" if value is None else f"{value:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")

    rm_acc = (f"{reward_model.metrics['reward_model/eval_accuracy']:.3f}" if reward_model is not None else "n/a")
    description = "\n".join([
        f"**{name} [v{version}](#/models/{name}/versions/{version})** — aliases: {', '.join(model_version.aliases)}"
        + (" (serving as champion)" if champion else " (not champion)"),
        "",
        f"- Gate: {evaluation['reason']}",
        f"- Gold win rate vs reference: {figure('eval/gold_win_rate')}; learned-reward win rate: "
        f"{figure('eval/rm_win_rate')}; KL to reference {figure('eval/kl', 2)} nats per answer",
        f"- Reward model held-out accuracy: {rm_acc}",
        f"- {evaluation['champion']}",
        "",
        "The stage runs below hold the detail: the evaluation's side-by-side answers "
        "(`evaluate` → Artifacts → `evaluation/side_by_side.json`), PPO's curves, the data report.",
    ])
    tags = {"registered_model": name, "registered_version": str(version), "registered_model_uri": f"models:/{name}/{version}",
            "gate.promote": str(evaluation["promote"]), "gate.reason": evaluation["reason"]}
    tracking.summarise_parent_run(parent_run_id, headline, tags, description)
    tracking.end_parent_run(parent_run_id)
    experiment = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    uri = f"models:/{name}@champion" if champion else f"models:/{name}/{version}"
    lines = [
        f"done: {name} v{version} {model_version.aliases}; gold win rate {figure('eval/gold_win_rate')}, "
        f"KL {figure('eval/kl', 2)}",
        f"  gate: {evaluation['reason']}",
        "next:",
        f"  see the runs:            {tracking.ui_link(experiment, parent_run_id)}",
        f"  read the answers:        python {flow} card view {run_id + '/' if run_id else ''}evaluate",
        f"  serve this version:      python -m rlhf_lightning serve --model-uri {uri}",
    ]
    if not champion:
        lines.append(f"  make it the champion:    python -m rlhf_lightning promote --version {version}   "
                     "(runs the serving checks first)")
    print("\n".join(lines))
