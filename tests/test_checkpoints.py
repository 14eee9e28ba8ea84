"""Checkpoints that a later attempt resumes from: PPO and the reward model stopped half-way and resumed
end exactly where an uninterrupted run ends (weights, history, RNG, data order); stores on disk and
on S3 keep the last k; a checkpoint made with another config is not resumed; the data order picks up
mid-epoch. The killed-process versions of these run through the flow in test_flow.py."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from rlhf_lightning.checkpoints import (
    CheckpointPlan,
    CheckpointStore,
    PeriodicCheckpoint,
    checkpoint_name,
    checkpointing,
    fingerprint,
)
from rlhf_lightning.models.sampling import SeededOrder
from test_ppo import prompt_rows
from test_ppo import tiny_cfg as ppo_cfg
from test_reward_model import preference_rows
from test_reward_model import tiny_cfg as rm_cfg


class Interrupted(Exception):
    pass


class StopAt(Callback):
    """Raise when batch `batch_idx` (0-based, counted over all epochs) is about to start: the process
    'dies' with the batches before it done, some of them after the last checkpoint."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.batch_idx:
            raise Interrupted


class Steps(Logger):
    """Records every (step, metric) the training logs."""

    def __init__(self):
        super().__init__()
        self.points: list[tuple[int, str]] = []

    name, version = "steps", "0"

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.points += [(step, key) for key in metrics]


def test_seeded_order_resumes_mid_epoch_and_matches_random_sampler():
    from torch.utils.data import RandomSampler

    order = SeededOrder(7, 12, seed=3)
    full = list(order)
    assert full == list(RandomSampler(range(7), num_samples=12, generator=torch.Generator().manual_seed(3)))
    resumed = SeededOrder(7, 12, seed=3)
    resumed.load_state_dict({"epoch": 0, "drawn": 5})
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # the skip applies once, to the epoch it was saved in
    other_epoch = SeededOrder(7, None, seed=3)
    other_epoch.set_epoch(1)
    assert sorted(other_epoch) == list(range(7)) and list(other_epoch) != list(SeededOrder(7, None, seed=3))


@pytest.mark.parametrize("where", ["dir", "s3"])
def test_store_puts_lists_gets_and_keeps_the_last_k(where, tmp_path, request):
    if where == "s3":
        import boto3

        request.getfixturevalue("s3_server")
        boto3.client("s3").create_bucket(Bucket="ckpt")
        uri = "s3://ckpt/flows/run-1/reinforce"
    else:
        uri = str(tmp_path / "store")
    store = CheckpointStore(uri)
    assert store.names() == []
    for batches in (2, 4, 10):
        path = tmp_path / checkpoint_name(batches)
        path.write_bytes(f"weights after {batches}".encode())
        store.put(path)
    assert store.names() == ["batch-00000002.ckpt", "batch-00000004.ckpt", "batch-00000010.ckpt"]
    store.prune(2)
    assert store.names() == ["batch-00000004.ckpt", "batch-00000010.ckpt"]
    got = store.get("batch-00000010.ckpt", tmp_path / "fetched")
    assert got.read_bytes() == b"weights after 10"


def _ppo_run(cfg, rows, rm_dir, out, plan=None, stop_at=None, logger=None, fp="ppo"):
    from rlhf_lightning.models.ppo import train_ppo

    callback, resumed = checkpointing(plan or CheckpointPlan(save_to=str(out / "store")), local_dir=out / "local",
                                      every_n_batches=2, keep_last=2, fingerprint=fp)
    extra = [StopAt(stop_at)] if stop_at is not None else []
    result = train_ppo(cfg, rows, rm_dir, str(out), logger=logger, callbacks=[callback, *extra],
                       ckpt_path=resumed and resumed.path)
    return result, resumed


def _adapter(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    weights.update({f"value_head.{k}": v for k, v in torch.load(f"{result.adapter_dir}/value_head.pt").items()})
    return weights


def test_ppo_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, reward_model_dir):
    """6 iterations, a checkpoint every 2; the interrupted run dies before iteration 5 with iteration 4
    done but not checkpointed. Resumed from the checkpoint after 4 iterations, it redoes iteration 4 and
    ends with the uninterrupted run's adapter, value head, KL coefficient and history; its logger sees
    every iteration once."""
    cfg = ppo_cfg(ppo={"iterations": 6, "kl_target": 0.5, "kl_horizon": 20})  # the KL coefficient moves
    from rlhf_lightning.models.loading import load_tokenizer

    rows = prompt_rows(load_tokenizer("tiny:llama"))
    straight, _ = _ppo_run(cfg, rows, reward_model_dir, tmp_path / "straight")

    plan = CheckpointPlan(save_to=str(tmp_path / "store"), resume_from=[str(tmp_path / "store")])
    with pytest.raises(Interrupted):
        _ppo_run(cfg, rows, reward_model_dir, tmp_path / "first", plan, stop_at=5)
    assert CheckpointStore(plan.save_to).names() == ["batch-00000002.ckpt", "batch-00000004.ckpt"]

    logger = Steps()
    resumed_result, resumed = _ppo_run(cfg, rows, reward_model_dir, tmp_path / "second", plan, logger=logger)
    assert resumed is not None and resumed.batches == 4
    assert [h["iteration"] for h in resumed_result.history] == list(range(6))
    steps = sorted({step for step, key in logger.points if key == "ppo/reward"})
    assert steps == list(range(6)) and len([1 for _, k in logger.points if k == "ppo/reward"]) == 6
    for a, b in zip(straight.history, resumed_result.history):
        assert a == pytest.approx(b, abs=1e-6)
    assert straight.history[-1]["ppo/kl_coef"] != cfg.ppo.kl_coef  # the controller moved and was restored
    want, got = _adapter(straight), _adapter(resumed_result)
    assert set(want) == set(got)
    for name in want:  # the same float operations in the same order on CPU: equal up to rounding
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    # The store keeps the newest two: the final checkpoint is among them.
    assert CheckpointStore(plan.save_to).names()[-1] == "batch-00000006.ckpt"


def test_a_checkpoint_made_with_another_config_is_not_resumed(tmp_path, reward_model_dir, capsys):
    from rlhf_lightning.models.loading import load_tokenizer

    cfg = ppo_cfg(ppo={"iterations": 2})
    rows = prompt_rows(load_tokenizer("tiny:llama"))
    plan = CheckpointPlan(save_to=str(tmp_path / "store"), resume_from=[str(tmp_path / "store")])
    _ppo_run(cfg, rows, reward_model_dir, tmp_path / "a", plan, fp=fingerprint({"lr": 1}))
    _, resumed = _ppo_run(cfg, rows, reward_model_dir, tmp_path / "b", plan, fp=fingerprint({"lr": 2}))
    assert resumed is None
    assert "was made with another config or data" in capsys.readouterr().out


def test_reward_model_resumed_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    """2 epochs of 8 batches, a checkpoint every 4 batches; stopped at batch 14, resumed from the
    checkpoint at batch 12, in the middle of the second epoch: the same model and metrics as without a
    stop."""
    from rlhf_lightning.models.reward_model import train_reward_model

    cfg = rm_cfg(epochs=2)
    train, held_out = preference_rows(48, 0), preference_rows(16, 1)

    def run(out, plan, stop_at=None):
        callback, resumed = checkpointing(plan, local_dir=out / "local", every_n_batches=4, keep_last=3,
                                          fingerprint="rm")
        extra = [StopAt(stop_at)] if stop_at is not None else []
        return train_reward_model(cfg, train, held_out, str(out), callbacks=[callback, *extra],
                                  ckpt_path=resumed and resumed.path), resumed

    straight, _ = run(tmp_path / "straight", CheckpointPlan(save_to=str(tmp_path / "s0")))
    plan = CheckpointPlan(save_to=str(tmp_path / "store"), resume_from=[str(tmp_path / "store")])
    with pytest.raises(Interrupted):
        run(tmp_path / "first", plan, stop_at=14)
    assert CheckpointStore(plan.save_to).names() == [checkpoint_name(n) for n in (4, 8, 12)]
    again, resumed = run(tmp_path / "second", plan)
    assert resumed.batches == 12
    assert again.metrics == pytest.approx(straight.metrics, abs=1e-6)
    from safetensors.torch import load_file

    want = load_file(f"{straight.model_dir}/model.safetensors")
    got = load_file(f"{again.model_dir}/model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_periodic_checkpoint_rejects_nonsense():
    with pytest.raises(ValueError):
        PeriodicCheckpoint("x", "y", every_n_batches=0, keep_last=1, fingerprint="f")


def test_rng_states_restore_on_fewer_gpus_than_they_were_saved_with(monkeypatch):
    """A checkpoint written with 4 GPUs' RNG states, resumed on a 1-GPU machine: device 0 gets its saved
    stream, the others are not asked for (CUDA's API played here: this machine has no GPU)."""
    import torch

    from rlhf_lightning.checkpoints import rng_states, set_rng_states

    saved = {**rng_states(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, int(state[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("would fail on missing devices"))
    set_rng_states(saved)
    assert restored == [(0, 0)]
