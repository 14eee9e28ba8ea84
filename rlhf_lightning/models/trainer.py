"""The Lightning Trainer both training stages (reward model, PPO) run under, built from `trainer.*`."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from rlhf_lightning.config import ConfigError, TrainerConfig
from rlhf_lightning.models.loading import resolve_precision
from rlhf_lightning.models.progress import LineProgress, interactive


def resolve_strategy(strategy: str, devices: int) -> str:
    """The strategy a step's Trainer is given. Lightning's `auto` becomes `ddp` for several devices, whose
    launcher starts each rank by re-running this process's command line: inside a Metaflow step that is
    the whole step again, and two processes would write its artifacts. So `auto` over several devices is
    `ddp_spawn` (ranks are started as functions of this process); other names are the user's."""
    return "ddp_spawn" if strategy == "auto" and devices != 1 else strategy


def check_launcher(trainer: L.Trainer, strategy: str) -> None:
    """Refuse a strategy that would start its ranks by re-running the command line (`ddp`, `fsdp`,
    `deepspeed`, ... with several devices), whatever name chose it: see `resolve_strategy`."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if trainer.world_size > 1 and isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
        raise ConfigError(f"trainer.strategy: {strategy} starts its ranks by re-running the command line, which "
                          "inside a Metaflow step runs the whole step twice; use ddp_spawn (or auto, which "
                          "picks it for several devices)")


def strategy_object(name: str, timeout_s: int):
    """The strategy as Lightning takes it: `ddp_spawn` (and its find_unused_parameters variants) as a
    DDPStrategy holding `timeout_s`, the collective timeout its name cannot carry; other names as given."""
    if not name.startswith("ddp_spawn"):
        return name
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    unused = {"ddp_spawn": None, "ddp_spawn_find_unused_parameters_true": True,
              "ddp_spawn_find_unused_parameters_false": False}
    if name not in unused:
        return name
    extra = {} if unused[name] is None else {"find_unused_parameters": unused[name]}
    return DDPStrategy(start_method="spawn", timeout=timedelta(seconds=timeout_s), **extra)


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
    built = L.Trainer(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                      strategy=strategy_object(resolve_strategy(trainer.strategy, trainer.world_size),
                                               trainer.collective_timeout_s),
                      precision=resolve_precision(trainer.precision, trainer.accelerator), enable_progress_bar=tty,
                      callbacks=callbacks, enable_checkpointing=checkpointing, **kwargs)
    check_launcher(built, trainer.strategy)
    return built
