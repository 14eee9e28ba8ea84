"""The held-out monitor: policy vs reference on a few held-out prompts while PPO trains.

A Lightning callback that the pipeline hands to `train_ppo`; its figures (`heldout/...`) make the
over-optimisation curve (`plots.overoptimisation_figure`).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from rlhf_lightning.config import EvaluationConfig
from rlhf_lightning.evaluation.compare import compare


class HeldoutMonitor(Callback):
    """During PPO, every `every_n_iterations` iterations and after the last: policy vs reference on a few
    held-out prompts (one sample each), logged as `heldout/...` and added to the iteration's history."""

    def __init__(self, rows: list[dict], ev: EvaluationConfig, gold: bool):
        if ev.every_n_iterations <= 0:
            raise ValueError("HeldoutMonitor needs evaluation.every_n_iterations > 0")
        self.rows, self.ev, self.gold = rows[: ev.monitor_prompts], ev, gold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last = batch_idx + 1 == trainer.num_training_batches
        if (batch_idx + 1) % self.ev.every_n_iterations and not last:
            return
        metrics, _ = compare(pl_module.policy, pl_module.tokenizer, pl_module.rewards, self.rows,
                             max_new_tokens=self.ev.max_new_tokens, temperature=self.ev.temperature,
                             batch_size=self.ev.batch_size, seed=self.ev.seed, gold=self.gold, prefix="heldout/",
                             engine=getattr(pl_module, "engine", None))
        pl_module.history[-1].update(metrics)
        # Straight to the loggers, at the iteration: `log_dict` from a callback keeps the values in
        # Lightning's step results, which then re-logs them, stale, at every later iteration.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch_idx)
