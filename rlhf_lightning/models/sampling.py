"""Data orders that a checkpoint can resume in the middle of an epoch.

Lightning restores the model, the optimiser and its loops from a checkpoint, but a plain DataLoader
starts its epoch again from the first batch: a run killed half-way through an epoch would see that
half twice. `ResumableLoader` implements the `state_dict` / `load_state_dict` pair that Lightning saves
with every checkpoint and restores before it iterates again, and `SeededOrder` makes the order itself a
function of (seed, epoch) alone, so the restored loader skips exactly what was drawn.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class SeededOrder(Sampler[int]):
    """`per_process` indices into `n_rows` rows per epoch and process (None: one pass over the rows split
    over the processes, the last ones padded by wrapping around), in an order drawn from a generator
    seeded with `seed + epoch` (or 0, 1, 2, ... without `shuffle`): fresh permutations chained, so every row
    comes once per pass before any repeats. Under DDP the order is drawn for all processes and each
    takes every world-th index (so processes see different rows, and the same number of them).

    With one process, one epoch and `shuffle`, it draws exactly what
    `RandomSampler(num_samples=per_process, generator=torch.Generator().manual_seed(seed))` draws.

    Only integers are stored (a `torch.Generator` does not pickle into ddp_spawn workers)."""

    def __init__(self, n_rows: int, per_process: int | None, seed: int = 0, shuffle: bool = True):
        self.n_rows, self._per_process, self.seed, self.shuffle = n_rows, per_process, seed, shuffle
        self.epoch = 0
        self.drawn = 0  # indices handed out in the current epoch
        self._skip: tuple[int, int] | None = None  # (epoch, indices) to skip, from a checkpoint

    @property
    def per_process(self) -> int:
        if self._per_process is not None:
            return self._per_process
        return -(-self.n_rows // _rank_world()[1])  # asked for inside the worker processes under DDP

    def __len__(self) -> int:
        return self.per_process

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """This process's indices for the current epoch."""
        rank, world = _rank_world()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order: list[int] = []
        while len(order) < self.per_process * world:
            order += torch.randperm(self.n_rows, generator=generator).tolist() if self.shuffle else list(range(self.n_rows))
        return order[rank::world][: self.per_process]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None:
            epoch, drawn = self._skip
            self._skip = None
            if epoch == self.epoch:
                start = drawn
        self.drawn = start
        for index in self.order()[start:]:
            self.drawn += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration over the same epoch continues after the indices already drawn."""
        self._skip = (int(state["epoch"]), int(state["drawn"]))


class ResumableLoader(DataLoader):
    """A DataLoader over a `SeededOrder` whose position Lightning saves in checkpoints and restores.

    The position is counted in indices the sampler has handed out. With `num_workers=0` (no prefetching)
    and a sized loader (Lightning's fetcher does not look ahead then), that is exactly the batches the
    training loop has taken when a checkpoint is written."""

    def __init__(self, dataset: Any, sampler: SeededOrder, batch_size: int, **kwargs: Any):
        if kwargs.get("num_workers", 0):
            raise ValueError("ResumableLoader counts what it handed out: use num_workers=0")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
