"""Progress away from a terminal (pytest's captured stderr is not one): plain lines, not '\r' bars."""

from __future__ import annotations

import pytest

from rlhf_lightning.models import progress
from test_reward_model import preference_rows, tiny_cfg  # noqa: E402 (tests dir is on sys.path)


def test_progress_prints_lines_instead_of_a_carriage_return_bar(capsys, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    assert list(progress.progress(range(3), desc="generate", unit="batch")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("generate:   0%") and lines[-1].startswith("generate: 100%")
    assert "3/3" in lines[-1]


@pytest.mark.usefixtures("one_torch_thread")
def test_training_reports_batches_epochs_metrics_and_time_left(capsys, monkeypatch, tmp_path):
    from rlhf_lightning.models.reward_model import train_reward_model

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    # One prompt per row, so batches are plain slices of batch_size rows (no grouping by prompt).
    rows = [dict(row, prompt=f"{row['prompt']} #{i}") for i, row in enumerate(preference_rows(32, 0))]
    train_reward_model(tiny_cfg(), rows, preference_rows(8, 1), str(tmp_path))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reward model: ")]
    epochs = tiny_cfg().reward_model.epochs
    batches = -(-32 // tiny_cfg().reward_model.batch_size)
    assert len(lines) == epochs * batches  # interval 0: one line per batch
    assert lines[0].startswith(f"reward model: epoch 1/{epochs} batch 1/{batches} ")
    assert lines[-1].startswith(f"reward model: epoch {epochs}/{epochs} batch {batches}/{batches} ")
    assert "s/batch, ~0.0 min left in the epoch)" in lines[-1]
