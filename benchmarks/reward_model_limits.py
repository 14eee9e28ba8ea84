"""What limits the reward model's held-out accuracy on the built-in task: label noise or the model?

  python benchmarks/reward_model_limits.py [--config configs/default.yaml] [--variants labels,gold] [--json F]

Same pairs, same split, same model and budget (`reward_model.*` of the config), trained side by side on
  labels  the annotator's noisy labels (what the pipeline trains on), and
  gold    the same pairs ordered by the gold judge (noise-free labels: what a perfect annotator would give);
each is scored on the held-out pairs against the noisy labels (`eval_accuracy`, the gate's figure) and
against the gold judge (`eval_gold_accuracy`).

Also printed, from the held-out pairs alone:
  label ceiling   the accuracy against the noisy labels of a reward model that orders every pair as the gold
                  judge does: the observed share, and its expectation under the Bradley-Terry annotator,
                  mean(max(p, 1 - p)) with p = sigmoid(beta * (gold_a - gold_b)), which has no sampling noise
                  from the labels.
For a reward model that agrees with the gold judge on a share q of pairs, the accuracy against the labels is
about q * ceiling + (1 - q) * (1 - ceiling) when its mistakes fall on pairs as noisy as the rest: q is the
number that has to rise. If training on gold labels raises q a lot, the noisy labels (and so the amount of
data) limit the model; if not, the model and its input do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gold_ordered(rows: list[dict]) -> list[dict]:
    """The same pairs with `chosen` the response the gold judge scores higher (ties kept as labelled)."""
    from rlhf_lightning import judge

    out = []
    for r in rows:
        if judge.gold_score(r["rejected"]) > judge.gold_score(r["chosen"]):
            r = r | {"chosen": r["rejected"], "rejected": r["chosen"]}
        out.append(r)
    return out


def expected_label_ceiling(rows: list[dict], beta: float) -> float:
    """The ceiling's expectation under the annotator: mean(max(p, 1 - p)). (The observed share is
    `eval_label_gold_agreement`, which `train_reward_model` measures.)"""
    from rlhf_lightning import judge

    total = 0.0
    for r in rows:
        p = judge.preference_probability(judge.gold_score(r["chosen"]), judge.gold_score(r["rejected"]), beta)
        total += max(p, 1 - p)
    return total / len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--variants", default="labels,gold", help="comma-separated: labels, gold")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    from rlhf_lightning.config import load_config
    from rlhf_lightning.data import preprocess as pre
    from rlhf_lightning.judge import has_gold_judge
    from rlhf_lightning.models import reward_model as rm

    cfg = load_config(args.config)
    if not has_gold_judge(cfg):
        print("error: this benchmark needs the built-in task (its gold judge); the config points at other data",
              file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="rm-limits-")
    data = pre.preprocess(cfg, os.path.join(work, "preprocess"))
    train, held_out = data.pref_train, data.pref_eval
    n = len(held_out)
    ceiling = {"expected": expected_label_ceiling(held_out, cfg.data.builtin.annotator_beta)}
    results = {"train_pairs": len(train), "eval_pairs": n, "label_ceiling": ceiling, "variants": {}}
    print(f"{len(train)} training pairs, {n} held-out pairs; label ceiling on the held-out pairs: "
          f"expected {ceiling['expected']:.3f}")
    for variant in args.variants.split(","):
        rows = {"labels": train, "gold": gold_ordered(train)}[variant]
        flipped = sum(a["chosen"] != b["chosen"] for a, b in zip(rows, train))
        start = time.perf_counter()
        m = rm.train_reward_model(cfg, rows, held_out, os.path.join(work, variant)).metrics
        seconds = time.perf_counter() - start
        ceiling["observed"] = m["eval_label_gold_agreement"]  # the same held-out pairs and labels in every variant
        results["variants"][variant] = m | {"train_labels_flipped": flipped, "seconds": seconds}
        print(f"[{variant}] {flipped} training labels flipped; held-out accuracy vs labels "
              f"{m['eval_accuracy']:.3f} ± {m['eval_accuracy_ci95']:.3f} (95%, clustered by prompt), vs gold {m['eval_gold_accuracy']:.3f}; "
              f"train accuracy {m['train_accuracy']:.3f}; {seconds:.0f} s", flush=True)
    print(f"\nvariant  acc-vs-labels  acc-vs-gold  (label ceiling: observed {ceiling['observed']:.3f}, "
          f"expected {ceiling['expected']:.3f})")
    for name, m in results["variants"].items():
        print(f"{name:8} {m['eval_accuracy']:13.3f}  {m['eval_gold_accuracy']:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
