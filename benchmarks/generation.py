"""Generation throughput by batch size: the policy's sampling as PPO's rollout and the built-in task use it
(`rlhf_lightning.models.generation.sample`), on the first HH prompts (chat-templated, cut to 64 tokens).

  python benchmarks/generation.py [--batches 1,4,16,64] [--max-new-tokens 32] [--precision 32-true]

tokens/s counts the response tokens produced (up to each response's end token); the last line is
`SUMMARY generation key=value ...` with one `tok_per_s_b<batch>` per batch size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from devices import accelerator, add_device_flag, peak_fields  # noqa: E402

from project_ppo import POLICY, hh_prompts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=64, help="prompts generated for at each batch size")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    add_device_flag(ap)
    args = ap.parse_args()

    import torch

    from rlhf_lightning.config import PolicyConfig
    from rlhf_lightning.models.generation import sample
    from rlhf_lightning.models.loading import load_policy, load_tokenizer

    tok = load_tokenizer(POLICY)
    accelerator(args.device)  # stops when CUDA was asked for and is not there
    model = load_policy(PolicyConfig(model=POLICY), trainable=False).eval().to(args.device)
    if args.precision == "bf16-true":  # the weights themselves in bf16, no autocast
        model = model.to(torch.bfloat16)
    prompts = [r["prompt_chat"] for r in hh_prompts(tok, args.prompts, 64)]
    figures = {}
    for batch in (int(b) for b in args.batches.split(",")):
        produced, start = 0, time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            for i in range(0, len(prompts), batch):
                out = sample(model, tok, prompts[i : i + batch], max_new_tokens=args.max_new_tokens,
                             temperature=0.7, seed=i)
                produced += int(out.response_mask.sum())
        figures[f"tok_per_s_b{batch}"] = produced / (time.perf_counter() - start)
        print(f"[info] batch {batch}: {figures[f'tok_per_s_b{batch}']:.1f} response tokens/s", flush=True)
    print("SUMMARY generation " + " ".join(f"{k}={v:.1f}" for k, v in figures.items())
          + f" device={args.device} precision={args.precision} max_new_tokens={args.max_new_tokens} "
          + peak_fields(args.device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
