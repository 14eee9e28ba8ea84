"""One function per pipeline stage: open the stage's MLflow run, call the library, record the result.

The Metaflow flow (flows/rlhf.py) calls these and stores what they return as artifacts; the CLI
(`python -m rlhf_lightning`) and tests call them without Metaflow. Models cross step boundaries as
`ModelBundle`s (a tar of the directory) because on AWS Batch each step runs on another machine.

Everything a stage returns is a dataclass (`ModelBundle`, `Prompts`, `Evaluated`, `Endpoint`,
`Served`) or a library type. torch, Lightning, matplotlib and the data readers are imported inside the
stages that use them, so that the light steps (start, join, end) start in a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rlhf_lightning import hardware, judge, tracking
from rlhf_lightning.evaluation import gates
from rlhf_lightning.config import RLHFConfig, to_dict

if TYPE_CHECKING:
    from rlhf_lightning.checkpoints import CheckpointPlan
    from rlhf_lightning.data.preprocess import PreparedData
    from rlhf_lightning.serving.registry import ModelVersionInfo


@dataclass
class ModelBundle:
    """A model directory packed for a Metaflow artifact, plus what the producing stage measured."""

    tar: bytes
    metrics: dict[str, Any]
    mlflow_run_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    """PPO's per-iteration statistics (empty for the reward model)."""

    @classmethod
    def pack(cls, directory: str, **kwargs: Any) -> ModelBundle:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(directory, arcname=".")
        return cls(tar=buf.getvalue(), **kwargs)

    def published_as(self) -> str:
        """A reward model's bundle: the published model it references (pinned to its version), `trained` (a
        model trained here), or `none` (no reward model: reward functions alone)."""
        with tarfile.open(fileobj=io.BytesIO(self.tar)) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            if "published.json" in members:
                return json.load(tar.extractfile(members["published.json"]))["model"]
        return "trained" if set(members) - {"."} else "none"

    def extract(self, directory: str) -> str:
        """Unpack into `directory` (reused if already unpacked there) and return it."""
        path = Path(directory)
        if not path.is_dir() or not any(path.iterdir()):
            path.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(self.tar)) as tar:
                tar.extractall(path, filter="data")
        return str(path)


@dataclass
class Prompts:
    """The prompts the later stages use (rows with `prompt` and `prompt_chat`)."""

    rl: list[dict]
    """PPO's rollout prompts."""
    eval: list[dict]
    """Held-out prompts: the evaluation's, and the first few the held-out monitor's."""


@dataclass
class Evaluated:
    """The evaluate stage's figures and the promotion gate's decision."""

    metrics: dict[str, float]
    promote: bool
    reason: str
    """The gate's decision in words, with the numbers behind it."""
    champion: str
    """Whether and which champion the policy was compared with."""
    mlflow_run_id: str


@dataclass
class Endpoint:
    """Where `deploy` put the candidate: enough to reach it again through the same deployments client,
    wherever the next step runs (no URL, port or process id)."""

    target: str
    name: str
    model_uri: str
    alias: str
    version: str


@dataclass
class Served:
    """The inference stage's report: the checks and answers (`inference.InferenceReport.to_dict`), and the
    server left running on this machine ({url, pid}) when `serving.keep_running`, else None."""

    report: dict[str, Any]
    endpoint: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.report["ok"])


class Card(Protocol):
    """Where a stage shows people its report: the step's Metaflow card (the flow adapts it), or nothing."""

    def markdown(self, text: str) -> None: ...

    def figure(self, fig: Any) -> None: ...


class NoCard:
    """No card (the CLI, tests): what a stage would show is in MLflow anyway."""

    def markdown(self, text: str) -> None:
        pass

    def figure(self, fig: Any) -> None:
        pass


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return "| metric | value |\n|---|---|\n" + rows


def _checkpointing(cfg: RLHFConfig, plan: CheckpointPlan | None, workdir: str, stage: str, every_n: int,
                   fingerprint: str, run_id: str):
    """The stage's checkpoint callback and the checkpoint it resumes from (recorded on its run). Without
    a plan (the CLI, tests) checkpoints go to `workdir/checkpoints` and nothing is resumed."""
    from rlhf_lightning import checkpoints

    local = os.path.join(workdir, "checkpoints")
    callback, resumed = checkpoints.checkpointing(plan or checkpoints.CheckpointPlan(save_to=local), local_dir=local,
                                                  every_n_batches=every_n, keep_last=cfg.faults.keep_last,
                                                  fingerprint=fingerprint, mlflow_run_id=run_id)
    if resumed is not None:
        tracking.set_tags({"resumed_from": f"{resumed.source}/{os.path.basename(resumed.path)}",
                           "resumed_at_batch": resumed.batches, "resumed_from_mlflow_run": resumed.mlflow_run_id})
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
    if not cfg.uses_builtin_task:
        return [None]
    from rlhf_lightning.data import builtin

    if builtin.cached_task(cfg.data.builtin, cfg.policy, cfg.generation, cfg.trainer.devices):
        return [None]
    count = cfg.data.builtin.sampling_workers
    return [(index, count) for index in range(count)]


def sample_builtin_task(cfg: RLHFConfig, shard: Shard | None) -> dict[tuple[int, int], list[str]]:
    """One shard's responses of the built-in task (`builtin.sample_shard`); {} for None."""
    if shard is None:
        return {}
    hardware.check_gpu(cfg.trainer.accelerator)
    from rlhf_lightning.data import builtin

    # Every device the step has samples its own every-n-th job of the shard (each job is seeded by itself:
    # the same texts however the jobs are split, except with vLLM on a GPU, whose cache key therefore
    # names the devices).
    index, count = shard
    devices = hardware.local_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    if devices > 1:
        print(f"built-in task: shard {index + 1} of {count} sampled on {devices} devices at once", flush=True)
    parts = hardware.over_devices(builtin.sample_shard, [
        (cfg.data.builtin, cfg.policy, index + count * d, count * devices, cfg.generation) for d in range(devices)],
        cfg.trainer.accelerator)
    return {job: texts for part in parts for job, texts in part.items()}


def preprocess(cfg: RLHFConfig, parent_run_id: str, workdir: str,
               responses: dict[tuple[int, int], list[str]] | None = None) -> PreparedData:
    """Read, clean, template, truncate and split every source; with `responses` (every shard's, joined),
    first write the built-in task's files from them."""
    from rlhf_lightning.data import builtin
    from rlhf_lightning.data import preprocess as pre

    with tracking.stage_run(parent_run_id, "preprocess"):
        if responses:
            builtin.write_task(cfg.data.builtin, cfg.policy, responses, cfg.generation, cfg.trainer.devices)
            tracking.log_metrics({"builtin/sampling_workers": cfg.data.builtin.sampling_workers})
        data = pre.preprocess(cfg, workdir)
        for name, path in data.files.items():
            rows = getattr(data, name)
            tracking.log_rows_dataset(rows, path=path, name=name, context="training" if "train" in name or name == "rl_prompts" else "evaluation")
        tracking.log_dict_artifact(data.counts, "preprocess/counts.json")
        tracking.log_metrics({f"rows/{k}": len(getattr(data, k)) for k in pre.SPLITS})
    return data


def validate(cfg: RLHFConfig, parent_run_id: str, data: PreparedData, workdir: str, card: Card = NoCard()) -> dict:
    """Check every row; raise `DataValidationError` (stopping the run before any training) on errors.
    Returns the report (`ValidationReport.to_dict`: the document written to MLflow)."""
    from rlhf_lightning.data import validate as val

    with tracking.stage_run(parent_run_id, "validate"):
        report = val.validate(data, cfg)
        path = report.write_json(os.path.join(workdir, "validation_report.json"))
        print(val.summary(report, path))  # the console says what `validate` says, warnings included
        tracking.log_artifact(path, "validation")
        tracking.log_metrics({"validation/errors": len(report.errors), "validation/warnings": len(report.warnings),
                              **{f"validation/errors/{k}": v for k, v in report.stats["errors_by_kind"].items()},
                              **{f"validation/warnings/{k}": v for k, v in report.stats["warnings_by_kind"].items()}})
        fig = report.histogram_figure()
        tracking.log_figure(fig, "validation/lengths.png")
        card.markdown("# Validation report\n\n" + report.markdown()
                      + f"\n\nFull report (every problem): `{path}`, MLflow artifact `validation/validation_report.json`")
        card.figure(fig)
        report.raise_if_errors(path)
    return report.to_dict()


def _join_the_fit(cfg: RLHFConfig, node: hardware.Node, stage: str, workdir: str, checkpoints: CheckpointPlan | None,
                  fingerprint: str, every_n: int, fit) -> None:
    """A node other than node 0 of a training step over several: its processes take their part in the
    fit node 0 leads, from the checkpoint node 0 resumes from (the same search finds the same one), and
    it records nothing (no MLflow run, no card, no checkpoint, no artifact). `fit(workdir, callbacks,
    ckpt_path)` runs the stage's training function; the node keeps its files in a directory of its own
    (the nodes of a local `@parallel` run share one disk)."""
    from rlhf_lightning import checkpoints as ckpt

    workdir = os.path.join(workdir, f"node{node.index}")
    local = os.path.join(workdir, "checkpoints")
    callback, resumed = ckpt.checkpointing(checkpoints or ckpt.CheckpointPlan(save_to=local), local_dir=local,
                                           every_n_batches=every_n, keep_last=cfg.faults.keep_last,
                                           fingerprint=fingerprint)
    where = f", resuming from {os.path.basename(resumed.path)}" if resumed is not None else ""
    print(f"{stage}: node {node.index} of {node.count} takes part in the fit node 0 leads{where}", flush=True)
    with hardware.node_world(node):
        fit(workdir, [callback], resumed and resumed.path)


def train_reward_model(cfg: RLHFConfig, parent_run_id: str, data: PreparedData, workdir: str, card: Card = NoCard(),
                       checkpoints: CheckpointPlan | None = None, node: hardware.Node | None = None
                       ) -> ModelBundle | None:
    """Train and measure the reward model, and register it (`registry.reward_model_name`); or, training
    nothing, measure `reward_model.pretrained` as published, or pass on none (`reward.model_weight: null`).
    Raise `gates.GateError` (stopping the run before RL) when its held-out accuracy is below
    `reward_model.min_eval_accuracy`. `checkpoints`: where to save
    checkpoints and look for one to resume from. `node`: this machine, when the step runs on several
    (`trainer.num_nodes`); only node 0 returns the model and records anything, the others return None."""
    hardware.check_gpu(cfg.trainer.accelerator)
    from rlhf_lightning import checkpoints as ckpt
    from rlhf_lightning.models import reward_model as rm

    if not cfg.trains_reward_model:  # nothing to train: node 0 alone loads and measures what there is
        return None if node is not None and not node.control else _untrained_reward_model(cfg, parent_run_id, data,
                                                                                           workdir, card)
    fingerprint = ckpt.fingerprint(to_dict(cfg.reward_model), rm.resolve_backbone(cfg), data.digests())
    if node is not None and not node.control:
        _join_the_fit(cfg, node, "reward model", workdir, checkpoints, fingerprint, cfg.faults.checkpoint_every_n_steps,
                      lambda wd, callbacks, ckpt_path: rm.train_reward_model(
                          cfg, data.pref_train, data.pref_eval, wd, callbacks=callbacks, ckpt_path=ckpt_path))
        return None
    with tracking.stage_run(parent_run_id, "train_reward_model") as run, hardware.node_world(node):
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
        tracking.log_artifacts(result.model_dir, "reward_model")
        card.markdown("# Reward model\n\n" + _metrics_table(metrics))
        _reward_model_gate(cfg, parent_run_id, result.metrics, len(data.pref_eval), card)
        if cfg.registry.reward_model_name:
            _register_reward_model(cfg, parent_run_id, data, result.model_dir, metrics, run.info.run_id, card)
    print(f"reward model: held-out accuracy {result.metrics['eval_accuracy']:.3f} ± {result.metrics['eval_accuracy_ci95']:.3f} "
          f"on {len(data.pref_eval)} pairs")
    return ModelBundle.pack(result.model_dir, metrics=metrics, mlflow_run_id=run.info.run_id)


def _reward_model_gate(cfg: RLHFConfig, parent_run_id: str, measured: dict[str, float], pairs: int, card: Card,
                       published: str = "") -> None:
    """The gate before RL on the reward model's held-out accuracy: recorded (tags, card), then raised, so
    the stage run is FAILED and the flow stops here."""
    threshold = cfg.reward_model.min_eval_accuracy
    passed = measured["eval_accuracy"] >= threshold
    tracking.set_tags({"gate.reward_model": "passed" if passed else "failed",
                       "gate.reward_model.min_eval_accuracy": threshold})
    card.markdown(f"**Gate:** held-out accuracy {measured['eval_accuracy']:.3f} "
                  f"± {measured['eval_accuracy_ci95']:.3f} (95%, clustered by prompt) "
                  f"{'>=' if passed else '<'} reward_model.min_eval_accuracy {threshold:.3f}")
    try:
        gates.check_reward_model(measured, threshold, pairs, published)
    except gates.GateError as exc:
        # The run ends here (whoever drives the stages, the flow or the CLI).
        tracking.fail_parent(parent_run_id, step="train_reward_model", reason=str(exc), expected=True)
        raise


def _register_reward_model(cfg: RLHFConfig, parent_run_id: str, data: PreparedData, model_dir: str,
                           metrics: dict[str, float], run_id: str, card: Card) -> None:
    """The reward model trained here as a model of its own in the registry (`registry.reward_model_name`)."""
    from rlhf_lightning.serving import registry

    tags = {"lineage.mlflow_parent_run_id": parent_run_id, "lineage.reward_model_run_id": run_id,
            **data_lineage(data, preferences_only=True),
            **{f"eval.{k.split('/', 1)[-1]}": f"{v:.4f}" for k, v in metrics.items()}}
    info = registry.register_reward_model(cfg, model_dir, run_id, tags)
    tracking.set_tags({"reward_model.registered": info.model_uri})
    card.markdown(f"Registered as **{info.model_uri}** (alias {', '.join(info.aliases)}): a later run trains "
                  f"against it with `reward_model.pretrained: {info.model_uri}`; serve it with "
                  f"`python -m rlhf_lightning serve --model-uri {info.model_uri}`.")
    print(f"reward model registered as {info.model_uri} {info.aliases}")


def _untrained_reward_model(cfg: RLHFConfig, parent_run_id: str, data: PreparedData, workdir: str,
                            card: Card) -> ModelBundle:
    """The reward-model stage when it trains nothing: a published reward model (`reward_model.pretrained`)
    measured as it is, or no reward model at all (`reward.model_weight: null`: an empty bundle)."""
    from rlhf_lightning.models import reward_model as rm

    with tracking.stage_run(parent_run_id, "train_reward_model") as run:
        if not cfg.reward.uses_model:
            tracking.set_tags({"reward_model": "none (reward.model_weight: null)"})
            card.markdown("# Reward model\n\nNone: the reward is the reward functions alone "
                          "(`reward.model_weight: null`).")
            print("reward model: none (reward.model_weight: null); PPO maximises the reward functions")
            empty = Path(workdir) / "no_reward_model"
            empty.mkdir(parents=True, exist_ok=True)
            return ModelBundle.pack(str(empty), metrics={}, mlflow_run_id=run.info.run_id)
        result, samples = rm.measure_published(cfg, data.pref_eval, data.rl_prompts, workdir)
        metrics = {f"reward_model/{k}": v for k, v in result.metrics.items()}
        tracking.log_metrics(metrics)
        tracking.set_tags({"reward_model.pretrained": cfg.reward_model.pretrained})
        tracking.log_artifacts(result.model_dir, "reward_model")
        tracking.log_table(samples, "reward_model/normalisation_samples.json")
        card.markdown(f"# Reward model\n\n`{cfg.reward_model.pretrained}`, used as published.\n\n"
                      + _metrics_table(metrics) + "\n\nPPO normalises its scores by their mean and std on "
                      f"{len(samples)} responses the policy sampled for the RL prompts (MLflow artifact "
                      "`reward_model/normalisation_samples.json`).")
        if data.pref_eval:
            _reward_model_gate(cfg, parent_run_id, result.metrics, len(data.pref_eval), card, cfg.reward_model.pretrained)
            measured = (f"held-out accuracy {result.metrics['eval_accuracy']:.3f} ± "
                        f"{result.metrics['eval_accuracy_ci95']:.3f} on {len(data.pref_eval)} pairs")
        else:
            tracking.set_tags({"gate.reward_model": "skipped: no preference data"})
            card.markdown("**Gate:** skipped: the data has no preference pairs to measure the reward model on.")
            measured = "not measured (no preference data: the gate is skipped)"
    print(f"reward model: {cfg.reward_model.pretrained} as published; {measured}; normalisation mean "
          f"{result.reward_mean:.3f} std {result.reward_std:.3f} on {len(samples)} policy samples")
    return ModelBundle.pack(result.model_dir, metrics=metrics, mlflow_run_id=run.info.run_id)


def prepare_prompts(cfg: RLHFConfig, parent_run_id: str, data: PreparedData) -> Prompts:
    with tracking.stage_run(parent_run_id, "prepare_prompts"):
        tracking.log_metrics({"prompts/rl": len(data.rl_prompts), "prompts/eval": len(data.eval_prompts)})
        tracking.log_dict_artifact(
            {"rl_prompts": data.rl_prompts[:20], "eval_prompts": data.eval_prompts[:20]}, "prompts/sample.json"
        )
    return Prompts(rl=data.rl_prompts, eval=data.eval_prompts)


def reinforce(cfg: RLHFConfig, parent_run_id: str, prompts: Prompts, reward_model: ModelBundle, workdir: str,
              card: Card = NoCard(), checkpoints: CheckpointPlan | None = None, node: hardware.Node | None = None
              ) -> ModelBundle | None:
    """PPO; logs the per-iteration history, training curves and the over-optimisation plot.
    `checkpoints`: where to save checkpoints and look for one to resume from (a resumed run continues
    the iterations, metrics and history of the checkpoint). `node`: this machine, when the step runs on
    several (`trainer.num_nodes`); only node 0 returns the policy and records anything, the others None."""
    hardware.check_gpu(cfg.trainer.accelerator)
    from rlhf_lightning import checkpoints as ckpt
    from rlhf_lightning.evaluation import plots
    from rlhf_lightning.models import ppo
    from rlhf_lightning.evaluation.monitor import HeldoutMonitor

    gold = judge.has_gold_judge(cfg)
    fingerprint = ckpt.fingerprint(to_dict(cfg.policy), to_dict(cfg.ppo), to_dict(cfg.reward), prompts.rl,
                                   hashlib.sha256(reward_model.tar).hexdigest())
    if node is not None and not node.control:
        def fit(wd: str, callbacks: list, ckpt_path: str | None) -> None:
            rm_dir = reward_model.extract(os.path.join(wd, "reward_model"))
            # gold_judge as node 0 has it: every rank gathers the same statistics each iteration.
            ppo.train_ppo(cfg, prompts.rl, rm_dir, wd, gold_judge=gold, callbacks=callbacks, ckpt_path=ckpt_path)

        _join_the_fit(cfg, node, "PPO", workdir, checkpoints, fingerprint, cfg.faults.checkpoint_every_n_iterations, fit)
        return None
    rm_dir = reward_model.extract(os.path.join(workdir, "reward_model"))
    # The monitor's prompts are the first held-out prompts: never trained on, cheap to sample.
    callbacks = ([HeldoutMonitor(prompts.eval, cfg.evaluation, gold)]
                 if cfg.evaluation.every_n_iterations > 0 else [])
    with tracking.stage_run(parent_run_id, "reinforce") as run, hardware.node_world(node):
        callback, resumed = _checkpointing(cfg, checkpoints, workdir, "PPO", cfg.faults.checkpoint_every_n_iterations,
                                           fingerprint, run.info.run_id)
        logger = tracking.lightning_logger(run.info.run_id)
        result = ppo.train_ppo(cfg, prompts.rl, rm_dir, workdir, logger=logger, gold_judge=gold,
                               callbacks=[*callbacks, callback], ckpt_path=resumed and resumed.path)
        tracking.log_artifacts(result.adapter_dir, "adapter")
        tracking.log_dict_artifact(result.history, "ppo/history.json")
        fig = plots.training_curves_figure(result.history)
        tracking.log_figure(fig, "ppo/training_curves.png")
        overopt = plots.overoptimisation_figure(result.history)
        tracking.log_figure(overopt, "ppo/overoptimisation.png")
        card.markdown("# PPO\n\n" + _metrics_table(result.metrics) + "\n\n" + PPO_KL_NOTE)
        card.figure(overopt)
        card.figure(fig)
    return ModelBundle.pack(result.adapter_dir, metrics=result.metrics, mlflow_run_id=run.info.run_id,
                            history=result.history)


PPO_KL_NOTE = (
    "`ppo/kl` is KL(policy ‖ reference) in nats per sequence, estimated from each iteration's rollouts as "
    "the sum over their tokens of log π(token) − log π_ref(token). The estimate is unbiased but noisy: while "
    "the two models are close, and with few rollouts, one batch can read below zero. The evaluate stage "
    "measures the KL on held-out prompts with more samples.")


def evaluate(cfg: RLHFConfig, parent_run_id: str, prompts: Prompts, reward_model: ModelBundle, policy: ModelBundle,
             workdir: str, card: Card = NoCard()) -> Evaluated:
    """Policy vs reference (and vs the current champion) on the held-out prompts, and the promotion gate.
    The decision and the numbers behind it are recorded on the evaluate run (metrics + `gate.*` tags)."""
    hardware.check_gpu(cfg.trainer.accelerator)
    from rlhf_lightning.evaluation import compare
    from rlhf_lightning.serving import registry

    rm_dir = reward_model.extract(os.path.join(workdir, "reward_model"))
    adapter_dir = policy.extract(os.path.join(workdir, "adapter"))
    with tracking.stage_run(parent_run_id, "evaluate") as run:
        champion, champion_note = (registry.champion_adapter(cfg.registry.model_name, cfg.policy.model, workdir)
                                   if cfg.evaluation.compare_champion
                                   else (None, "champion comparison off (evaluation.compare_champion)"))
        result = compare.evaluate(cfg, prompts.eval, adapter_dir, rm_dir, champion=champion)
        metrics = {**result.metrics, "gate/promote": float(result.promote),
                   "gate/threshold": 0.5 + cfg.evaluation.promotion_margin,
                   **{k: v for k, v in reward_model.metrics.items() if k == "reward_model/eval_accuracy"}}
        tracking.log_metrics(metrics)
        tracking.log_dict_artifact(result.samples, "evaluation/samples.json")
        shown = compare.side_by_side(result.samples)
        tracking.log_table(shown, "evaluation/side_by_side.json")  # a table in the MLflow UI
        tracking.set_tags({"gate.promote": result.promote, "gate.reason": result.reason,
                           "gate.champion": champion_note})
        served = ""
        if result.served:
            tracking.log_table(result.served, "evaluation/served_vs_evaluated.json")
            served = ("## What is served, beside what was evaluated\n\nThis 4-bit run was evaluated on its nf4 "
                      "base; the registered version serves the base in full precision with the adapter merged. "
                      f"Both answered {len(result.served)} held-out prompts greedily: "
                      f"{metrics['eval/served_greedy_match']:.0%} of the answers are identical, reward "
                      f"{metrics['eval/served_rm_gap']:+.2f} ± {metrics['eval/served_rm_gap_ci95']:.2f} std "
                      "(served − evaluated). The first few (all: MLflow artifact "
                      f"`evaluation/served_vs_evaluated.json`):\n\n"
                      f"{compare.side_by_side_markdown(result.served[:5])}\n\n")
        card.markdown(f"# Evaluation\n\n**Gate:** {result.reason}\n\nChampion: {champion_note}\n\n"
                      "## What the policy says, beside the reference\n\nThe held-out answers the policy "
                      "improved most and least, then a few as they came (all of them: MLflow artifact "
                      f"`evaluation/samples.json`).\n\n{compare.side_by_side_markdown(shown)}\n\n"
                      f"{served}## Figures\n\n{_metrics_table(metrics)}")
    print(f"evaluation: {result.reason} ({champion_note})")
    return Evaluated(metrics=metrics, promote=result.promote, reason=result.reason, champion=champion_note,
                     mlflow_run_id=run.info.run_id)


def data_lineage(data: PreparedData, preferences_only: bool = False) -> dict[str, str]:
    """Model Registry tags naming the data a model was trained on: the sha256 of each canonical split and
    the input files (all of them, or only the preference pairs and their files: a reward model's)."""
    digests = {k: v for k, v in data.digests().items() if not preferences_only or k.startswith("pref")}
    # The built-in task has no input files: its generated files are the sources then.
    sources = data.sources.get("preferences", []) if preferences_only else data.sources
    return {**{f"lineage.data.{k}_sha256": v for k, v in digests.items()},
            "lineage.data.sources": json.dumps(sources)[:4900]}  # tag values are capped at 5000 chars


def lineage_tags(parent_run_id: str, data: PreparedData, reward_model: ModelBundle, policy: ModelBundle,
                 evaluated: Evaluated, metaflow: dict[str, str] | None = None) -> dict[str, str]:
    """What a registered version came from, as Model Registry tags: the Metaflow run, the MLflow runs of
    the stages that made it, the data (sha256 of each canonical split + the input files), the evaluation
    figures and the gate decision."""
    tags = {
        "lineage.mlflow_parent_run_id": parent_run_id,
        "lineage.reward_model_run_id": reward_model.mlflow_run_id,
        "lineage.ppo_run_id": policy.mlflow_run_id,
        "lineage.evaluate_run_id": evaluated.mlflow_run_id,
        "lineage.reward.model": reward_model.published_as(),
        **data_lineage(data),
        "gate.promote": str(evaluated.promote),
        "gate.reason": evaluated.reason,
        "gate.champion": evaluated.champion,
        **{f"eval.{k.split('/', 1)[-1] if k.startswith('eval/') else k}": f"{v:.4f}"
           for k, v in evaluated.metrics.items()},
    }
    for key, value in (metaflow or {}).items():
        tags[f"lineage.metaflow.{key}"] = value
    return tags


def register(cfg: RLHFConfig, parent_run_id: str, policy: ModelBundle, workdir: str,
             lineage: dict[str, str]) -> ModelVersionInfo:
    """Log and register the policy with its `lineage` tags; alias `candidate` only (see `inference`)."""
    from rlhf_lightning.serving import registry
    from rlhf_lightning.models.loading import base_model_dir

    adapter_dir = policy.extract(os.path.join(workdir, "adapter"))
    # What it was trained to maximise: the reward model (lineage_tags says which) and the functions.
    reward = {"lineage.reward.model_weight": str(cfg.reward.model_weight),
              "lineage.reward.functions": json.dumps([{"function": f.function, "weight": f.weight}
                                                      for f in cfg.reward.functions])[:4900]}
    with tracking.stage_run(parent_run_id, "register") as run:
        info = registry.log_and_register(cfg, adapter_dir, base_model_dir(cfg.policy.model, workdir),
                                         run.info.run_id, tags={**reward, **lineage})
        tracking.set_tags({"model.name": info.name, "model.version": info.version})
    print(f"registered {info.name} version {info.version} aliases {info.aliases}")
    return info


def deployment_name(cfg: RLHFConfig) -> str:
    return cfg.serving.deployment_name or f"{cfg.registry.model_name}-candidate"


def deploy(cfg: RLHFConfig, parent_run_id: str, model_version: ModelVersionInfo) -> Endpoint:
    """Deploy the new candidate's version through MLflow's deployments API to `serving.target` (create
    the deployment, or update it to this version)."""
    from rlhf_lightning.serving import registry
    from rlhf_lightning.serving.deployments import create_or_update, deployment_config, get_client

    name = deployment_name(cfg)
    uri = f"models:/{model_version.name}/{model_version.version}"
    with tracking.stage_run(parent_run_id, "deploy"):
        exists = create_or_update(get_client(cfg.serving.target), name, uri, deployment_config(cfg.serving))
        endpoint = Endpoint(target=cfg.serving.target, name=name, model_uri=uri, alias=registry.CANDIDATE_ALIAS,
                            version=model_version.version)
        tracking.set_tags({f"deployment.{k}": v for k, v in asdict(endpoint).items()})
    print(f"deployed {uri} to {cfg.serving.target} as {name!r} ({'updated' if exists else 'created'})")
    return endpoint


def inference(cfg: RLHFConfig, parent_run_id: str, model_version: ModelVersionInfo, endpoint: Endpoint,
              evaluated: Evaluated, card: Card = NoCard()) -> tuple[Served, ModelVersionInfo]:
    """Check, through the deployments client of the target `deploy` used, that the deployment serves the
    registered version and weights and answers the inference template; only then, if the evaluation
    gate said so, move `champion` to this version. A server this step started (rlhf-local) is stopped
    unless `serving.keep_running`. Returns (the report, the version's info with its aliases now)."""
    from rlhf_lightning.serving import inference as inf
    from rlhf_lightning.serving import registry
    from rlhf_lightning.serving.deployments import LocalDeploymentClient, get_client

    client = get_client(endpoint.target)
    local = isinstance(client, LocalDeploymentClient)  # rlhf-local: a server this process starts and stops
    try:
        with tracking.stage_run(parent_run_id, "inference"):
            if local:
                client.serve(endpoint.name)  # start it first: the latencies are the requests' own
            # The checkpoint checks: the alias still names the version deploy deployed, the target serves
            # that version, and the served weights hash (in every answer) equals the registered adapter's.
            report = inf.serving_checks(client, endpoint.name, endpoint.model_uri, cfg.serving.requests,
                                        model_version.weights_sha256,
                                        alias=(model_version.name, endpoint.alias, endpoint.version))
            data = report.to_dict()
            tracking.log_dict_artifact(data, "inference/report.json")
            tracking.log_metrics({"inference/ok": float(report.ok),
                                  "inference/latency_s": max(a.latency_s for a in report.answers)})
            lines = [f"| {a.request['prompt'][:60]} | {(a.response or a.error or '')[:120]} |" for a in report.answers]
            card.markdown("# Inference template\n\n| prompt | response |\n|---|---|\n" + "\n".join(lines))
            if not report.ok:
                failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
                tracking.set_tags({"champion.decision": "not promoted: the deployed candidate failed its checks"})
                raise RuntimeError(f"inference checks failed, champion not moved: {failed}")
            if evaluated.promote:
                previous = registry.promote(model_version.name, model_version.version, evaluated.reason)
                decision = (f"promoted v{model_version.version} to champion"
                            + (f" (replacing v{previous})" if previous else ""))
            else:
                decision = f"champion not moved: {evaluated.reason}"
            tracking.set_tags({"champion.decision": decision})
            card.markdown(f"**Champion:** {decision}")
            print(decision)
    finally:
        left = client.close(keep_running=cfg.serving.keep_running) if local else {}
    served = Served(report=data, endpoint=left.get(endpoint.name))
    if served.endpoint:
        print(f"endpoint left running at {served.endpoint['url']} (pid {served.endpoint['pid']})")
    aliases = registry.version_aliases(model_version.name, model_version.version)
    return served, replace(model_version, aliases=aliases)


HEADLINE = ("eval/gold_win_rate", "eval/gold_win_rate_ci95", "eval/rm_win_rate", "eval/rm_win_rate_ci95",
            "eval/reward_win_rate", "eval/reward_win_rate_ci95", "eval/reward", "eval/ref_reward", "eval/kl",
            "eval/kl_per_token", "eval/gold_score", "eval/ref_gold_score", "gate/promote")


def end(parent_run_id: str, model_version: ModelVersionInfo, evaluated: Evaluated,
        reward_model: ModelBundle | None = None, flow: str = "flows/rlhf.py", run_id: str | None = None) -> None:
    """Put the headline on the parent run (metrics, the version and the gate's decision, a description
    that says what happened and links the version), close it, and print what to open next."""
    m = evaluated.metrics
    headline = {k: v for k, v in m.items() if k in HEADLINE}
    if reward_model is not None:
        headline |= {k: v for k, v in reward_model.metrics.items()
                     if k in ("reward_model/eval_accuracy", "reward_model/eval_accuracy_ci95")}
    name, version = model_version.name, model_version.version
    champion = "champion" in model_version.aliases

    def figure(key: str, digits: int = 3) -> str:
        value, ci = m.get(key), m.get(f"{key}_ci95")
        return "n/a" if value is None else f"{value:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")

    wins = "; ".join(f"{who} {figure(f'eval/{key}_win_rate')}" for key, who in
                     (("gold", "gold judge"), ("reward", "total reward"), ("rm", "reward model")) if f"eval/{key}_win_rate" in m)
    rm_acc = (f"{reward_model.metrics['reward_model/eval_accuracy']:.3f}"
              if reward_model is not None and "reward_model/eval_accuracy" in reward_model.metrics else "n/a")
    description = "\n".join([
        f"**{name} [v{version}](#/models/{name}/versions/{version})** — aliases: {', '.join(model_version.aliases)}"
        + (" (serving as champion)" if champion else " (not champion)"),
        "",
        f"- Gate: {evaluated.reason}",
        f"- Win rate vs reference: {wins}; KL to reference {figure('eval/kl', 2)} nats per answer",
        f"- Reward model held-out accuracy: {rm_acc}",
        f"- {evaluated.champion}",
        "",
        "The stage runs below hold the detail: the evaluation's side-by-side answers "
        "(`evaluate` → Artifacts → `evaluation/side_by_side.json`), PPO's curves, the data report.",
    ])
    tags = {"registered_model": name, "registered_version": str(version), "registered_model_uri": f"models:/{name}/{version}",
            "gate.promote": str(evaluated.promote), "gate.reason": evaluated.reason}
    tracking.summarise_parent_run(parent_run_id, headline, tags, description)
    tracking.end_parent_run(parent_run_id)
    experiment = tracking.experiment_of(parent_run_id)
    uri = f"models:/{name}@champion" if champion else f"models:/{name}/{version}"
    lines = [
        f"done: {name} v{version} {model_version.aliases}; win rate {wins}, KL {figure('eval/kl', 2)}",
        f"  gate: {evaluated.reason}",
        "next:",
        f"  see the runs:            {tracking.ui_link(experiment, parent_run_id)}",
        f"  read the answers:        python {flow} card view {run_id + '/' if run_id else ''}evaluate",
        f"  serve this version:      python -m rlhf_lightning serve --model-uri {uri}",
    ]
    if not champion:
        lines.append(f"  make it the champion:    python -m rlhf_lightning promote --version {version}   "
                     "(runs the serving checks first)")
    print("\n".join(lines))
