"""The wall time of Lightning's training loop alone, as the peers' figures time theirs."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class FitClock(Callback):
    """Seconds from the start to the end of training, less the validation passes Lightning runs inside it
    (TRL's figures time training alone). After `fit`, `wall` holds them."""

    start = val_start = validating = wall = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.validating = time.perf_counter(), 0.0  # after Lightning's sanity check

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validating += time.perf_counter() - self.val_start

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall = time.perf_counter() - self.start - self.validating


class StepPhases(Callback):
    """Wall seconds of a training step's phases, from Lightning's hooks, summed over the fit:
    `data` (fetching and collating the next batch: from one step's end to the next step's start), `forward`
    (the step's start to the backward: forward, loss), `backward`, `optimizer` (gradient clipping, the
    optimiser step, zeroing) and `validation`. After `fit`, `seconds` holds them."""

    def __init__(self):
        self.seconds = {name: 0.0 for name in ("data", "forward", "backward", "optimizer", "validation")}
        self._mark = self._val = None

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.seconds[phase] += now - self._mark
        self._mark = now

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lap("data")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._lap("forward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._lap("backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._lap("optimizer")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seconds["validation"] += time.perf_counter() - self._val
        self._mark = time.perf_counter()  # the next data lap starts after validation
