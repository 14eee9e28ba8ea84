"""Training checkpoints that outlive the machine: written every N batches, kept where the next attempt
reads them, and resumed from.

A stage that trains (the reward model, PPO) gets a `CheckpointPlan`: where this attempt saves its
checkpoints (a directory, or an `s3://` prefix that every container reaches) and where to look for one
to resume from (this run's own location first: a retry of the same step; then the location of the run
a `resume` started from). `PeriodicCheckpoint` writes a Lightning checkpoint every N batches and after
the last batch of every epoch: weights that train, optimiser state, the loops' progress, the data
loader's position (models/sampling.py), RNG states, and whatever the module adds (PPO: KL controller
and metric history). It uploads it and keeps the last k. A checkpoint records a fingerprint of the
config and data it was made with; one made with another fingerprint is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from rlhf_lightning.cache import s3_client, s3_split

NAME = re.compile(r"^batch-(\d{8})\.ckpt$")
KEY = "rlhf_lightning"  # our part of a Lightning checkpoint dict


def checkpoint_name(batches: int) -> str:
    return f"batch-{batches:08d}.ckpt"


def batches_of(name: str) -> int:
    """Training batches done when checkpoint `name` was written."""
    return int(NAME.match(name).group(1))


class CheckpointStore:
    """The checkpoints of one stage at one location: a local directory, or an `s3://bucket/prefix` (boto3:
    credentials and endpoint as it finds them, `AWS_ENDPOINT_URL_S3` honoured)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.s3 = self.uri.startswith("s3://")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    def names(self) -> list[str]:
        """Checkpoint file names, oldest first."""
        if self.s3:
            bucket, prefix = s3_split(f"{self.uri}/")
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = [obj["Key"].rsplit("/", 1)[-1] for page in pages for obj in page.get("Contents", [])]
        else:
            keys = os.listdir(self.uri) if os.path.isdir(self.uri) else []
        return sorted(k for k in keys if NAME.match(k))

    def put(self, path: str | Path) -> None:
        """Store the checkpoint file `path` under its own name. The upload goes to a temporary name first
        where renaming is atomic (a directory), and S3 never shows a partly written object."""
        path = Path(path)
        if self.s3:
            s3_client().upload_file(str(path), *s3_split(f"{self.uri}/{path.name}"))
        else:
            os.makedirs(self.uri, exist_ok=True)
            target = os.path.join(self.uri, path.name)
            if os.path.abspath(path) != os.path.abspath(target):
                shutil.copyfile(path, target + ".part")
                os.replace(target + ".part", target)

    def get(self, name: str, dest_dir: str | Path) -> Path:
        """Copy checkpoint `name` into `dest_dir`; return its path there."""
        dest = Path(dest_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.s3:
            s3_client().download_file(*s3_split(f"{self.uri}/{name}"), str(dest))
        elif os.path.abspath(os.path.join(self.uri, name)) != os.path.abspath(dest):
            shutil.copyfile(os.path.join(self.uri, name), dest)
        return dest

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints."""
        old = self.names()[:-keep] if keep > 0 else []
        if not old:
            return
        if self.s3:
            keys = [s3_split(f"{self.uri}/{name}") for name in old]
            s3_client().delete_objects(Bucket=keys[0][0], Delete={"Objects": [{"Key": key} for _, key in keys]})
        else:
            for name in old:
                os.remove(os.path.join(self.uri, name))


@dataclass
class CheckpointPlan:
    """Where a training stage saves its checkpoints and where it looks for one to resume from (how often
    and how many to keep: `faults` in the config)."""

    save_to: str
    """Directory or s3:// prefix of this attempt's checkpoints."""
    resume_from: list[str] = field(default_factory=list)
    """Locations searched in order; the first holding a checkpoint with the right fingerprint wins."""


@dataclass
class Resumed:
    """The checkpoint a stage resumed from."""

    path: str
    """Local copy, for `trainer.fit(ckpt_path=...)`."""
    source: str
    """Where it was found."""
    batches: int
    """Training batches it had done."""
    mlflow_run_id: str | None
    """The MLflow run the checkpointed attempt logged into."""


def fingerprint(*parts: Any) -> str:
    """A short digest of what a checkpoint is only valid for (config sections, data digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_resume_point(plan: CheckpointPlan, *, expected: str, local_dir: str | Path) -> Resumed | None:
    """The newest checkpoint at the first location of `plan.resume_from` that holds one made with the
    `expected` fingerprint, copied into `local_dir`; None to start from scratch. A checkpoint made with
    another config or data is reported and skipped, never loaded."""
    for uri in plan.resume_from:
        store = CheckpointStore(uri)
        for name in reversed(store.names()):
            path = store.get(name, local_dir)
            ours = torch.load(path, map_location="cpu", weights_only=False).get(KEY, {})
            made_with = ours.get("fingerprint")
            if made_with == expected:
                return Resumed(str(path), uri, batches_of(name), ours.get("mlflow_run_id"))
            print(f"checkpoint {uri}/{name} was made with another config or data "
                  f"({made_with} != {expected}): not resumed from")
            path.unlink()
            break  # the older ones there come from the same attempt
    return None


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        # Device by device, only those this machine has: a checkpoint written on more GPUs than a resume
        # gets (a smaller instance, or one process of a former ddp run) would make set_rng_state_all
        # fail on the missing ones. Devices the checkpoint did not know keep their own streams.
        for device, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


class PeriodicCheckpoint(Checkpoint):
    """Every `every_n_batches` training batches and after the last batch of every epoch: a full Lightning
    checkpoint in `local_dir`, copied to `save_to`, the last `keep_last` kept in both.

    Being a `Checkpoint`, Lightning runs it after every other callback's `on_train_batch_end`, so the
    state it saves is the state the next batch starts from. The RNG states saved with it are restored
    when training resumes."""

    def __init__(self, save_to: str, local_dir: str | Path, *, every_n_batches: int, keep_last: int,
                 fingerprint: str, resumed: Resumed | None = None, mlflow_run_id: str | None = None):
        if every_n_batches < 1 or keep_last < 1:
            raise ValueError("every_n_batches and keep_last must be >= 1")
        self.save_to, self.local_dir = save_to, Path(local_dir)
        self.every_n_batches, self.keep_last = every_n_batches, keep_last
        self.fingerprint, self.resumed, self.mlflow_run_id = fingerprint, resumed, mlflow_run_id
        self._rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[KEY] = {"fingerprint": self.fingerprint, "rng": rng_states(),
                           "mlflow_run_id": self.mlflow_run_id}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._rng = checkpoint.get(KEY, {}).get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, as late as possible: setting up the trainer may draw random numbers.
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None
        if self.resumed is not None and trainer.is_global_zero:
            # Chained resumes: a later `resume` of this run looks here, not where this one came from.
            CheckpointStore(self.save_to).put(self.resumed.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # batches over all epochs, this one included
        end_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if done % self.every_n_batches and not end_of_epoch:
            return
        path = self.local_dir / checkpoint_name(done)
        trainer.save_checkpoint(path, weights_only=False)  # all the state; every process takes part, rank 0 writes
        if trainer.is_global_zero:
            store = CheckpointStore(self.save_to)
            store.put(path)
            store.prune(self.keep_last)
            if os.path.abspath(store.uri) != os.path.abspath(self.local_dir):
                CheckpointStore(str(self.local_dir)).prune(self.keep_last)


def checkpointing(plan: CheckpointPlan, *, local_dir: str | Path, every_n_batches: int, keep_last: int,
                  fingerprint: str, mlflow_run_id: str | None = None) -> tuple[PeriodicCheckpoint, Resumed | None]:
    """The checkpoint callback of one training stage, and the checkpoint to resume from (None: start
    from scratch). Hand both to the stage's training function (`callbacks`, `ckpt_path`)."""
    resumed = find_resume_point(plan, expected=fingerprint, local_dir=Path(local_dir) / "resume")
    callback = PeriodicCheckpoint(plan.save_to, local_dir, every_n_batches=every_n_batches, keep_last=keep_last,
                                  fingerprint=fingerprint, resumed=resumed, mlflow_run_id=mlflow_run_id)
    return callback, resumed
