"""Bradley-Terry reward model: a LightningModule around a plain HF sequence-classification model.

The model reads a (prompt, response) text pair and returns one scalar. Training maximises
log sigmoid(r(chosen) - r(rejected)) over preference pairs. Over-long pairs are cut from the *left of the
prompt*, never dropped and never cut in the response: the response is what is judged (TRL's RewardTrainer
drops over-long pairs and lost accuracy for it).

`train_reward_model` fits it, saves a plain (LoRA-merged) HF model directory with `reward_stats.json`
(score mean/std on the training pairs, for PPO's reward normalisation, plus the final metrics), and
`RewardScorer` loads that directory for PPO and evaluation.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_lightning import judge
from rlhf_lightning.config import ConfigError, LoraConfig, RLHFConfig
from rlhf_lightning.models.loading import (compute_device, enable_gradient_checkpointing, load_reward_backbone,
                                           peft_lora_config, release_cached_memory, resolve_model)
from rlhf_lightning.models.losses import bradley_terry_loss
from rlhf_lightning.pair_encoding import PairEncoder
from rlhf_lightning.models.sampling import ResumableLoader, SeededOrder
from rlhf_lightning.models.trainer import build_trainer
from rlhf_lightning.stats import win_rate

STATS_FILE = "reward_stats.json"


TRAIN_PAD_MULTIPLE = 64
"""Training batches are padded to a multiple of this many positions, not to their longest row: with a
new width for nearly every batch, the process's peak memory kept growing for the whole fit while its live
tensors stayed the same (benchmarks/project_reward.py, MiniLM, 256 tokens, bf16-mixed: 2.23 GB at 1 000
pairs, 2.64-2.70 at 2 000); with four widths it peaked at 2.03 and 2.32 GB, at the same pairs/s and
held-out accuracy. The extra positions are masked, so the rewards do not change."""


class ChatEncoder:
    """(prompt, response) texts -> the conversation [user: prompt, assistant: response] rendered with the
    reward model's own chat template, tokenised as the template writes it (its BOS included), right-padded.

    Too long: the prompt loses its start, then the response its end, until it fits `max_length`. Decoder
    reward models without a pad token (Llama's) pool the last token that is not the pad id: the padding
    is filled with an id that ends no row of the batch, returned as `pad_token_id` for the model's config."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, prompt: str, response: str) -> list[int]:
        for _ in range(4):  # each pass cuts what overflowed (re-rendering may shift a token or two)
            ids = self._ids(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False))
            over = len(ids) - self.max_length
            if over <= 0:
                return ids
            prompt_ids = self._ids(prompt)
            cut = min(over, len(prompt_ids))
            prompt = self.tokenizer.decode(prompt_ids[cut:])
            if over > cut:  # the prompt is gone: the response loses its end
                response_ids = self._ids(response)
                response = self.tokenizer.decode(response_ids[: max(0, len(response_ids) - (over - cut))])
        return ids[: self.max_length]

    def __call__(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [self.render(p, r) for p, r in zip(prompts, responses)]
        width = max(map(len, rows))
        last = {row[-1] for row in rows}
        preferred = [self.tokenizer.pad_token_id] if self.tokenizer.pad_token_id is not None else []
        pad = next(i for i in [*preferred, *range(len(self.tokenizer))] if i not in last)
        return {"input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),  # (B, T)
                "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),  # (B, T)
                "pad_token_id": pad}


def distinct_sequences(rows: list[dict]) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """The distinct (prompt, response) sequences of preference rows, plus `chosen_index` / `rejected_index`
    (B,) into them. A ranking of K responses gives K(K-1)/2 rows but only K sequences to score: K-1 times
    fewer forward passes than one sequence per row side."""
    index: dict[tuple[str, str], int] = {}
    for row in rows:
        for side in ("chosen", "rejected"):
            index.setdefault((row["prompt"], row[side]), len(index))
    chosen = torch.tensor([index[(row["prompt"], row["chosen"])] for row in rows])  # (B,)
    rejected = torch.tensor([index[(row["prompt"], row["rejected"])] for row in rows])  # (B,)
    return list(index), chosen, rejected


def collate_preferences(rows: list[dict], encoder: PairEncoder) -> dict:
    """Preference rows -> `inputs` (U, T): the batch's distinct sequences, each encoded once, and
    `chosen_index` / `rejected_index` (B,) into them."""
    sequences, chosen, rejected = distinct_sequences(rows)
    return {"inputs": encoder([p for p, _ in sequences], [r for _, r in sequences]),
            "chosen_index": chosen, "rejected_index": rejected}


def prompt_groups(rows: list[dict], max_rows: int) -> list[list[dict]]:
    """Rows grouped by prompt, in first-seen order: the pairs of one ranking stay together. A prompt with
    more than `max_rows` rows (data whose prompt field is a fixed instruction, say) is cut into groups of
    `max_rows`, so no batch outgrows the configured size by much."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row)
    return [g[i : i + max_rows] for g in groups.values() for i in range(0, len(g), max_rows)]


def collate_groups(groups: list[list[dict]], encoder: PairEncoder) -> dict[str, torch.Tensor]:
    return collate_preferences([row for group in groups for row in group], encoder)


def group_loader(rows: list[dict], batch_size: int, shuffle: bool, encoder: PairEncoder,
                 seed: int = 0) -> ResumableLoader:
    """Batches of whole prompts, as InstructGPT trains its K(K-1)/2 comparisons per prompt: each response
    is scored once per epoch instead of K-1 times in different batches (which overfit there within an
    epoch). The dataset's items are prompts; `batch_size` rows become `batch_size / (rows per prompt)`
    prompts per batch. With one row per prompt this is ordinary batching. The order is drawn from
    (seed, epoch) and split over processes by the loader itself, so a checkpoint resumes it mid-epoch."""
    groups = prompt_groups(rows, batch_size)
    per_batch = max(1, round(batch_size * len(groups) / len(rows)))
    return ResumableLoader(groups, SeededOrder(len(groups), None, seed, shuffle), batch_size=per_batch,
                           collate_fn=partial(collate_groups, encoder=encoder))


def preference_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """accuracy = share of pairs with r_chosen > r_rejected; margin = mean(r_chosen - r_rejected)."""
    # r_chosen, r_rejected: (B,)
    return {
        "accuracy": (r_chosen > r_rejected).float().mean().item(),
        "margin": (r_chosen - r_rejected).mean().item(),
        "loss": bradley_terry_loss(r_chosen, r_rejected).item(),
    }


class RewardModel(L.LightningModule):
    """Bradley-Terry training of a scalar head on `backbone` (full fine-tuning or LoRA + head)."""

    def __init__(self, backbone: str, finetune: Literal["full", "lora"] = "full", lora: LoraConfig | None = None,
                 learning_rate: float = 5e-5, max_length: int = 160, dropout: float | None = None,
                 lr_schedule: Literal["linear", "constant"] = "linear", gradient_checkpointing: bool = False):
        super().__init__()
        if finetune == "lora" and lora is None:
            raise ValueError("finetune='lora' needs a LoraConfig")
        self.save_hyperparameters()
        self.learning_rate = learning_rate
        model, self.tokenizer = load_reward_backbone(backbone)
        if dropout is not None:
            # Every dropout layer, as TRL's disable_dropout_in_model does; attention reads its layer's `p`.
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = dropout
        if finetune == "lora":
            from peft import get_peft_model

            # Task type SEQ_CLS makes peft add the new head ("classifier" / "score") to modules_to_save,
            # so the randomly initialised head trains alongside the adapter.
            model = get_peft_model(model, peft_lora_config(lora, "SEQ_CLS", model, "reward_model.lora"))
        if gradient_checkpointing:  # trainer.gradient_checkpointing
            enable_gradient_checkpointing(model)
        self.model = model
        self.encoder = PairEncoder(self.tokenizer, max_length, pad_to_multiple_of=TRAIN_PAD_MULTIPLE)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch["inputs"]).logits.squeeze(-1).float()  # (U,)

    def _pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self(batch)  # (U,): one per distinct sequence (collate_preferences)
        return rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]  # (B,), (B,)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r_chosen, r_rejected = self._pair_rewards(batch)
        loss = bradley_terry_loss(r_chosen, r_rejected)
        n = r_chosen.shape[0]
        # Named as the stage's final figures (pipeline): one name per metric, the curve is its history.
        self.log("reward_model/train_loss", loss, prog_bar=True, batch_size=n)
        self.log("reward_model/train_accuracy", (r_chosen > r_rejected).float().mean(), batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_chosen, r_rejected = self._pair_rewards(batch)
        n = r_chosen.shape[0]
        for name, value in preference_metrics(r_chosen, r_rejected).items():
            self.log(f"reward_model/eval_{name}", value, prog_bar=name == "accuracy", batch_size=n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.learning_rate)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.lr_schedule == "linear":
            # Linear decay to 0 over the fit's optimiser steps, set from the step count before each step rather
            # than kept in a scheduler: a run resumed mid-epoch restores the step count, and with it the rate
            # (a LambdaLR restored from the same checkpoint drifted from an uninterrupted run).
            done = self.trainer.global_step / max(1, self.trainer.estimated_stepping_batches)
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.learning_rate * max(0.0, 1.0 - done)

    def export_model(self) -> torch.nn.Module:
        """The trained HF model alone; LoRA is merged so consumers need no peft."""
        if self.hparams.finetune == "lora":
            return self.model.merge_and_unload()
        return self.model


PUBLISHED_FILE = "published.json"
"""In place of a model directory: a reward model used as published (`reward_model.pretrained`), by
reference ({model, input, max_length, mean, std, metrics}): every step loads it from where it is
published (hub, directory, MLflow), so no step ships its weights to the next."""


def published_input(tokenizer: PreTrainedTokenizerBase, mode: str, path: str) -> str:
    """How a published reward model in `path` reads a (prompt, response) (`reward_model.input`): `chat`,
    `pair`, or, for `auto` on a reward model this project trained (its `reward_stats.json`), `trained`:
    the encoding it was trained with."""
    if mode == "auto" and (Path(path) / STATS_FILE).is_file():
        return "trained"
    if mode == "chat" and not tokenizer.chat_template:
        raise ConfigError("config: reward_model.input: chat, but the reward model's tokenizer has no chat "
                          "template; use pair (or auto)")
    mode = mode if mode != "auto" else ("chat" if tokenizer.chat_template else "pair")
    if mode == "pair" and (tokenizer.pad_token_id is None or tokenizer.num_special_tokens_to_add(pair=True) == 0):
        raise ConfigError("config: reward_model.input: pair, but the reward model's tokenizer has no pair encoding "
                          "(no separator or no pad token: a decoder's); give it a chat template (input: chat) or use "
                          "a reward model published with one")
    return mode


def fetch_model_uri(uri: str, workdir: str | Path) -> str:
    """A reward model this project registered (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/...`),
    downloaded from MLflow: the directory of its transformers model."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
    # The registered pyfunc's `reward_model` artifact (MLflow keeps its source directory's name under
    # artifacts/), or the directory itself (`runs:/RUN/reward_model`, as the stage run logs it).
    found = sorted(p.parent for p in [local / STATS_FILE, *local.glob(f"artifacts/*/{STATS_FILE}")] if p.is_file())
    if not found:
        raise ConfigError(f"config: reward_model.pretrained: {uri} holds no reward model registered by this project "
                          f"(no artifacts/*/{STATS_FILE} in {local}); name a version of registry.reward_model_name, "
                          "a hub id or a transformers directory")
    return str(found[0])


def pinned(ref: str) -> str:
    """`models:/NAME@ALIAS` as the version the alias names now (`models:/NAME/VERSION`): every step scores
    with the model that was measured, even if the alias moves during the run. Other references as given."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", ref)
    if not match:
        return ref
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(*match.groups()).version
    except MlflowException as exc:
        raise ConfigError(f"config: reward_model.pretrained: {ref}: no such registered model or alias in the registry "
                          f"({exc.message.splitlines()[0]}); name a version, models:/NAME/VERSION") from None
    return f"models:/{match.group(1)}/{version}"


def load_published(ref: str, workdir: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """A published sequence-classification reward model as it is: its head, its dtype, its tokenizer (and
    the local directory they came from)."""
    path = fetch_model_uri(ref, workdir) if ref.startswith(("models:/", "runs:/")) else resolve_model(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConfigError(f"config: reward_model.pretrained: {ref} has no trained weights for "
                          f"{', '.join(sorted(info['missing_keys'])[:3])}: it is not a reward model (a base or "
                          "causal LM would score with a random head); name a sequence-classification reward model")
    if model.config.num_labels != 1:
        raise ConfigError(f"config: reward_model.pretrained: {ref} is a classifier with {model.config.num_labels} "
                          "outputs; a reward model has one (a scalar score per conversation). Multi-objective "
                          "reward models with their own scoring code are not supported")
    return model, tokenizer, path


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model, batched, without gradients."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 mean: float = 0.0, std: float = 1.0, input: str = "trained"):
        """`input`: `trained` (a model trained here: `PairEncoder` with its newline), or a published
        model's `chat` (`ChatEncoder`) or `pair` (the tokenizer's own pair encoding)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.input = input
        self.encoder = (ChatEncoder(tokenizer, max_length) if input == "chat"
                        else PairEncoder(tokenizer, max_length, separator="" if input == "pair" else "\n"))
        self.mean, self.std = mean, std

    @classmethod
    def load(cls, model_dir: str | Path) -> RewardScorer:
        """A trained model's directory (`save`), or one holding a published model's reference (`PUBLISHED_FILE`)."""
        published = Path(model_dir) / PUBLISHED_FILE
        if published.is_file():
            ref = json.loads(published.read_text())
            # A directory of its own per process: the devices of an evaluation load it side by side.
            model, tokenizer, _ = load_published(ref["model"], Path(model_dir) / f"download-{os.getpid()}")
            return cls(model, tokenizer, ref["max_length"], ref["mean"], ref["std"], input=ref["input"])
        stats = json.loads((Path(model_dir) / STATS_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
        return cls(model, tokenizer, stats["max_length"], stats["mean"], stats["std"])

    def save(self, model_dir: str | Path, metrics: dict[str, float] | None = None) -> None:
        """HF model + tokenizer + reward_stats.json (what `load` reads back)."""
        model_dir = Path(model_dir)
        self.model.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        stats = {"mean": self.mean, "std": self.std, "max_length": self.max_length, "metrics": metrics or {}}
        (model_dir / STATS_FILE).write_text(json.dumps(stats, indent=2))

    def to(self, device: torch.device | str) -> RewardScorer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_tokens: int = 8192) -> torch.Tensor:
        """Raw scores, float32 on the CPU, in the order given, computed in the model's dtype (fp32) also
        inside autocast. Batches are cut from the sequences sorted by length, each trimmed to its longest and
        holding at most `batch_tokens` positions (32 sequences of 256 tokens, 128 of 64): preference data
        mixes short and long texts, and batches of random members padded to their longest wasted up to half
        of the forward passes, while a fixed number of rows per batch would let long ones set the peak
        memory."""
        device = next(self.model.parameters()).device
        encoded = self.encoder(prompts, responses)  # (B, T), right-padded to the longest of all
        if "pad_token_id" in encoded:  # ChatEncoder: the model pools the last token that is not this id
            self.model.config.pad_token_id = encoded.pop("pad_token_id")
        lengths = encoded["attention_mask"].sum(1)  # (B,)
        order = torch.argsort(lengths, descending=True, stable=True)
        out = torch.empty(len(prompts))
        start = 0
        while start < len(order):
            width = int(lengths[order[start]])  # the longest left: it sets this batch's width
            rows = order[start : start + max(1, batch_tokens // width)]
            batch = {k: v[rows, :width].to(device) for k, v in encoded.items()}
            # Outside any autocast (PPO's training step runs under bf16/16-mixed): the model computes in its
            # own dtype, fp32 as `load` builds it, so PPO's rewards are exactly the scores evaluation and
            # the reward normalisation statistics were measured with, not half-precision roundings of them.
            with torch.autocast(device_type=device.type, enabled=False):
                out[rows] = self.model(**batch).logits.squeeze(-1).float().cpu()  # (b,)
            start += len(rows)
        return out  # (B,)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores on the scale of the training pairs: zero mean, unit std (keeps PPO's KL coef meaningful)."""
        return (scores - self.mean) / self.std

    def score_pairs(self, rows: list[dict], batch_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected) of preference rows, scoring each distinct response once."""
        sequences, chosen, rejected = distinct_sequences(rows)
        scores = self.score([p for p, _ in sequences], [r for _, r in sequences], batch_tokens)  # (U,)
        return scores[chosen], scores[rejected]  # (B,), (B,)


def gold_agreement(rows: list[dict], r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Against the gold judge instead of the noisy labels (built-in task only):
    eval_gold_accuracy = share of pairs the reward model orders as the gold judge does;
    eval_label_gold_agreement = share whose label does: the ceiling of `eval_accuracy` for a perfect
    reward model. Gold ties count half."""
    # r_chosen, r_rejected: (N,)
    gold_diff = torch.tensor([judge.gold_score(r["chosen"]) - judge.gold_score(r["rejected"]) for r in rows])  # (N,)

    def agree(diff: torch.Tensor) -> float:
        return torch.where(gold_diff == 0, 0.5, ((diff > 0) == (gold_diff > 0)).float()).mean().item()

    return {"eval_gold_accuracy": agree(r_chosen - r_rejected), "eval_label_gold_agreement": agree(torch.ones_like(gold_diff))}


def heldout_metrics(cfg: RLHFConfig, scorer: RewardScorer, eval_rows: list[dict]) -> dict[str, float]:
    """A reward model on held-out preference rows, as the gate reads it: eval_accuracy/margin/loss, the
    accuracy's 95% half-width, and the agreement with the gold judge where there is one."""
    eval_chosen, eval_rejected = scorer.score_pairs(eval_rows)
    metrics = {f"eval_{k}": v for k, v in preference_metrics(eval_chosen, eval_rejected).items()}
    # 95% half-width, clustered by prompt: the pairs of one ranking are right or wrong together.
    metrics["eval_accuracy_ci95"] = win_rate(eval_chosen.tolist(), eval_rejected.tolist(),
                                             groups=[row["prompt"] for row in eval_rows])[1]
    if judge.has_gold_judge(cfg):
        metrics |= gold_agreement(eval_rows, eval_chosen, eval_rejected)
    return metrics


@dataclass
class RewardModelResult:
    model_dir: str
    """Directory of the HF model + tokenizer + reward_stats.json (load it with `RewardScorer.load`)."""
    metrics: dict[str, float]
    """Final model on the eval and train pairs: eval_accuracy, eval_margin, eval_loss, train_accuracy, ..."""
    reward_mean: float
    """Mean score of all chosen and rejected training responses."""
    reward_std: float
    """Their standard deviation."""
    steps: int = 0
    """Optimiser steps of the fit (the step the final figures belong to in the metric history)."""


def resolve_backbone(cfg: RLHFConfig) -> str:
    """`policy` means the policy's own base model."""
    return cfg.policy.model if cfg.reward_model.backbone == "policy" else cfg.reward_model.backbone


def train_reward_model(cfg: RLHFConfig, train_rows: list[dict], eval_rows: list[dict], out_dir: str,
                       logger=None, callbacks: list | None = None, ckpt_path: str | None = None) -> RewardModelResult | None:
    """Fit the reward model, save it to `out_dir/model` and measure it (None on a node other than node 0
    of a run over several: `hardware.node_world`). `logger`: a Lightning logger or
    None; `callbacks` may include a checkpoint callback (checkpoints.PeriodicCheckpoint), and `ckpt_path`
    resumes from one of its checkpoints (weights, optimiser, epoch and position in it, RNG)."""
    if not train_rows or not eval_rows:
        raise ValueError(f"reward model: need training and eval pairs, got {len(train_rows)} and {len(eval_rows)}")
    rm = cfg.reward_model
    out = Path(out_dir)
    L.seed_everything(rm.seed)
    module = RewardModel(backbone=resolve_backbone(cfg), finetune=rm.finetune,
                         lora=rm.lora if rm.finetune == "lora" else None,
                         learning_rate=rm.learning_rate, max_length=rm.max_length, dropout=rm.dropout,
                         lr_schedule=rm.lr_schedule, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    train_loader = group_loader(train_rows, rm.batch_size, True, module.encoder, rm.seed)
    eval_loader = group_loader(eval_rows, rm.batch_size, False, module.encoder)
    trainer = build_trainer(
        cfg.trainer, "reward model", max_epochs=rm.epochs, logger=logger if logger is not None else False,
        callbacks=callbacks, log_every_n_steps=min(50, len(train_loader)), default_root_dir=out,
        use_distributed_sampler=False,  # the loaders shard themselves
        gradient_clip_val=rm.max_grad_norm or None,
    )
    # Our own checkpoints: they hold the config dataclasses as hyperparameters.
    trainer.fit(module, train_loader, eval_loader, ckpt_path=ckpt_path, weights_only=False)
    if trainer.node_rank != 0:  # another machine's processes trained beside node 0's, which measures and saves
        return None

    # Measure the final model exactly as PPO and evaluation will use it: through a RewardScorer.
    # On the step's GPU when it has one: Lightning's teardown moved the model back to the CPU, where
    # scoring every training and held-out pair of a large set would take longer than the fit.
    scorer = RewardScorer(module.export_model(), module.tokenizer, rm.max_length).to(
        compute_device(cfg.trainer.accelerator))
    train_chosen, train_rejected = scorer.score_pairs(train_rows)
    all_train = torch.cat([train_chosen, train_rejected])  # (2N,)
    scorer.mean, scorer.std = all_train.mean().item(), all_train.std().clamp(min=1e-6).item()
    metrics = heldout_metrics(cfg, scorer, eval_rows)
    metrics |= {f"train_{k}": v for k, v in preference_metrics(train_chosen, train_rejected).items()}
    model_dir = out / "model"
    scorer.save(model_dir, metrics)
    return RewardModelResult(str(model_dir), metrics, scorer.mean, scorer.std, trainer.global_step)


def normalisation_samples(cfg: RLHFConfig, rl_prompts: list[dict]) -> tuple[list[dict], list[str]]:
    """The first `reward_model.normalisation_prompts` RL prompts and the policy's responses to them, as PPO's
    first rollouts would sample them (the base with a fresh adapter, at ppo.temperature and ppo.max_new_tokens)."""
    from rlhf_lightning.models.generation import sample
    from rlhf_lightning.models.loading import load_policy, policy_tokenizer, to_compute_device

    rows = rl_prompts[: cfg.reward_model.normalisation_prompts]
    policy = to_compute_device(load_policy(cfg.policy, trainable=False), cfg.trainer.accelerator,
                               quantized=cfg.policy.quantization == "4bit").eval()
    tokenizer = policy_tokenizer(cfg.policy)
    texts: list[str] = []
    batch = cfg.evaluation.batch_size
    for start in range(0, len(rows), batch):
        chats = [r["prompt_chat"] for r in rows[start : start + batch]]
        texts += sample(policy, tokenizer, chats, max_new_tokens=cfg.ppo.max_new_tokens,
                        temperature=cfg.ppo.temperature, seed=cfg.ppo.seed + start).texts
    return rows, texts


def measure_published(cfg: RLHFConfig, eval_rows: list[dict], rl_prompts: list[dict], out_dir: str
                      ) -> tuple[RewardModelResult, list[dict]]:
    """`reward_model.pretrained` as published: measured on the held-out preference pairs (where the data has
    them: else no `eval_accuracy`), and its normalisation (score mean and std) from its scores of the
    policy's responses to the RL prompts. Saves its reference (`PUBLISHED_FILE`) in `out_dir/model`.
    Returns the result and the scored samples ({prompt, response, score}) behind the normalisation."""
    rm = cfg.reward_model
    out = Path(out_dir) / "model"
    ref = pinned(rm.pretrained)
    # The policy's answers first: it leaves the device before the reward model comes.
    rows, texts = normalisation_samples(cfg, rl_prompts)
    release_cached_memory()
    model, tokenizer, path = load_published(ref, Path(out_dir) / "download")
    mode = published_input(tokenizer, rm.input, path)
    # A reward model trained here reads as long a text as it was trained on.
    max_length = json.loads((Path(path) / STATS_FILE).read_text())["max_length"] if mode == "trained" else rm.max_length
    scorer = RewardScorer(model, tokenizer, max_length, input=mode).to(compute_device(cfg.trainer.accelerator))
    metrics = heldout_metrics(cfg, scorer, eval_rows) if eval_rows else {}
    scores = scorer.score([r["prompt"] for r in rows], texts)  # (N,)
    scorer.mean, scorer.std = scores.mean().item(), scores.std().clamp(min=1e-6).item()
    metrics |= {"normalisation_mean": scorer.mean, "normalisation_std": scorer.std,
                "normalisation_samples": float(len(rows))}
    out.mkdir(parents=True, exist_ok=True)
    (out / PUBLISHED_FILE).write_text(json.dumps(
        {"model": ref, "input": scorer.input, "max_length": max_length, "mean": scorer.mean,
         "std": scorer.std, "metrics": metrics}, indent=2))
    samples = [{"prompt": r["prompt"], "response": t, "score": round(s, 4)}
               for r, t, s in zip(rows, texts, scores.tolist())]
    return RewardModelResult(str(out), metrics, scorer.mean, scorer.std), samples
