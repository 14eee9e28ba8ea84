"""The Lightning Trainer both training stages (reward model, PPO) run under, built from `trainer.*`."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from rlhf_lightning.config import TrainerConfig
from rlhf_lightning.models.loading import resolve_precision
from rlhf_lightning.models.progress import LineProgress, interactive


def build_trainer(trainer: TrainerConfig, name: str, callbacks: list | None = None, **kwargs) -> L.Trainer:
    """A Lightning Trainer with the configured hardware settings. Away from a terminal the progress bar
    becomes a line every 30 s, prefixed with `name`; `kwargs` go to `L.Trainer` (epochs, logger, ...)."""
    if trainer.threads > 0:
        torch.set_num_threads(trainer.threads)
    if torch.cuda.is_available():
        # TF32 for what still multiplies in fp32 on a GPU (the value head, fp32 runs): the tensor cores
        # at ~10 bits of mantissa, as Lightning itself advises; no effect on the CPU.
        torch.set_float32_matmul_precision("high")
    tty = interactive()
    callbacks = list(callbacks or []) + ([] if tty else [LineProgress(name)])
    # Checkpoints only from a checkpoint callback the caller passes (checkpoints.PeriodicCheckpoint):
    # Lightning's default one would write a second set nobody resumes from.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    return L.Trainer(accelerator=trainer.accelerator, devices=trainer.devices, strategy=trainer.strategy,
                     precision=resolve_precision(trainer.precision, trainer.accelerator), enable_progress_bar=tty,
                     callbacks=callbacks, enable_checkpointing=checkpointing, **kwargs)
