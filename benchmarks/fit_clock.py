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
