"""Progress that shows where output is not a terminal: Metaflow step logs, CI, `nohup`.

A carriage-return progress bar (tqdm, Lightning's rich bar) rewrites one line; a log captured line by
line shows nothing of it until the loop ends, so a 20-minute PPO step looked silent. Away from a
terminal these print a plain line every `interval` seconds instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

INTERVAL_S = 30.0
"""Seconds between progress lines away from a terminal."""


def interactive() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """A stream for tqdm that ends each refresh with a newline instead of starting it with a '\\r'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable, *, desc: str | None, total: int | None = None, unit: str = "it") -> Iterable:
    """tqdm on a terminal; elsewhere the same bar as a line every `INTERVAL_S` seconds."""
    if interactive():
        return tqdm(iterable, desc=desc, total=total, unit=unit)
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_Lines(sys.stderr), mininterval=INTERVAL_S,
                miniters=1, ascii=True)


class LineProgress(Callback):
    """Lightning: a line per `INTERVAL_S` seconds (and at the end of each epoch) with the batch, the
    progress-bar metrics, the rate and the time left."""

    def __init__(self, name: str, interval: float | None = None):
        self.name, self.interval = name, INTERVAL_S if interval is None else interval
        self._start: float | None = None
        self._last, self._first = 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # Here, not at the epoch's start: an attempt resumed from a checkpoint starts mid-epoch, and
        # Lightning does not call on_train_epoch_start then. The rate counts this attempt's batches only.
        if self._start is None:
            self._start = self._last = time.monotonic()
            self._first = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:  # one line per iteration for the run, not one per process
            return
        now = time.monotonic()
        total = trainer.num_training_batches
        if now - self._last < self.interval and batch_idx + 1 != total:
            return
        self._last = now
        done = batch_idx + 1
        per = (now - self._start) / (done - self._first)
        left = per * (total - done) if isinstance(total, int) else float("nan")
        metrics = " ".join(f"{k}={_fmt(v)}" for k, v in trainer.progress_bar_metrics.items())
        print(f"{self.name}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs} batch {done}/{total} "
              f"{metrics} ({per:.1f} s/batch, ~{left / 60:.1f} min left in the epoch)", file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
