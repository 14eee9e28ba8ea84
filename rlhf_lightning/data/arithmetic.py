"""A worked example of reward functions: small sums with their answers, rewarded by exact match.

Prompts are generated from a seed, as the built-in task's are: `What is 7 + 5? Reply with the number
only.` with the answer in the row's own `answer` column. `configs/arithmetic.yaml` trains on the files
this writes (`configs/data/arithmetic/`), with no reward model: PPO maximises `exact_match` (1 when the
response's last number is the answer) plus a little `number_only` (1 when the response is the number and
nothing else). Regenerate the files with

    python -m rlhf_lightning.data.arithmetic configs/data/arithmetic
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
NUMBER = re.compile(r"-?\d+")


def generate(n: int, seed: int, high: int = 20) -> list[dict]:
    """`n` distinct prompts {prompt, answer} of sums of integers in [1, high] (at most high² of them)."""
    if n > high * high:
        raise ValueError(f"{n} distinct sums of integers in [1, {high}] do not exist (at most {high * high})")
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, high + 1) for b in range(1, high + 1)]
    rng.shuffle(pairs)
    return [{"prompt": TEMPLATE.format(a=a, op="+", b=b), "answer": str(a + b)} for a, b in pairs[:n]]


def write(out_dir: str | Path, n_rl: int = 256, n_eval: int = 64, seed: int = 0) -> dict[str, str]:
    """`rl.jsonl` and `eval.jsonl` (no prompt in both) in `out_dir`; their paths by split."""
    rows = generate(n_rl + n_eval, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("rl", rows[:n_rl]), ("eval", rows[n_rl:])):
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def last_number(text: str) -> str | None:
    """The last integer in `text` (`7 + 5 = 12` -> `12`), or None."""
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def exact_match(prompts: list[str], responses: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where the response's last number is the row's `answer`, else 0.0."""
    return [float(last_number(r) == str(a).strip()) for r, a in zip(responses, answer)]


def number_only(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """1.0 where the response is one number and nothing else (what the prompt asks for), else 0.0."""
    return [float(bool(re.fullmatch(r"\s*-?\d+\s*\.?\s*", r))) for r in responses]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the arithmetic example's prompt files (rl.jsonl, eval.jsonl).")
    parser.add_argument("out_dir", help="directory to write them to, e.g. configs/data/arithmetic")
    parser.add_argument("--rl", type=int, default=256, help="RL prompts (default 256)")
    parser.add_argument("--eval", type=int, default=64, help="held-out evaluation prompts (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args()
    for split, path in write(args.out_dir, args.rl, args.eval, args.seed).items():
        print(f"{split}: {path}")
