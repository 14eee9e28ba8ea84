"""Response tokens/s of the two generation engines on the same prompts, side by side in one sitting.

  python benchmarks/engines.py                         # hf and vllm, 64 and 4096 prompts, alternated
  python benchmarks/engines.py --prompts 64 --rounds 1 # one size
  python benchmarks/engines.py --workload builtin      # the default run's sampling step with each engine
  python benchmarks/engines.py --run vllm --n 64       # one measurement in this process (what the driver runs)

The workload is PPO's rollout on the default policy: SmolLM2-135M-Instruct with a LoRA adapter (r 8,
q/k/v/o, its B matrices randomised so the adapter changes the answers), built-in-task prompts in the
chat template, 32 new tokens, temperature 0.7, a seed per row. `hf`: `models.generation.sample` in
batches of 64 (the project's default rollout and evaluation batch), fp32 on the CPU as PPO decodes.
`vllm`: one `engines.VLLMEngine` (the adapter handed over once, as before a rollout) given every prompt
at once; its start (seconds, before the first request) is reported apart. Each measurement runs in its
own process; the driver alternates the engines round by round and prints the ratio of the medians.

`--workload builtin`: the default run's built-in task sampled whole, as its sampling step does
(`data.builtin.sample_shard`: 1024 prompts x 4 responses of 32 tokens from the base, no adapter), with
`generation.backend` hf and vllm; the wall time includes loading the model or starting the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts(tok, n: int) -> list[str]:
    from rlhf_lightning.models.generation import chat_prompt
    from rlhf_lightning.task_prompts import all_prompts  # the built-in task's own prompts

    texts = all_prompts(0)
    return [chat_prompt(tok, texts[i % len(texts)]) for i in range(n)]


def measure_builtin(engine: str, args) -> dict:
    import torch

    from rlhf_lightning.config import GenerationConfig, RLHFConfig
    from rlhf_lightning.data import builtin

    cfg = RLHFConfig()
    t0 = time.perf_counter()
    out = builtin.sample_shard(cfg.data.builtin, cfg.policy,
                               generation=GenerationConfig(backend=engine, dtype=args.dtype))
    wall = time.perf_counter() - t0
    texts = [t for texts in out.values() for t in texts]
    return {"engine": engine, "prompts": len(texts), "tokens": 0, "wall_s": round(wall, 1), "tok_per_s": 0.0,
            "start_s": 0.0, "dtype": args.dtype if engine == "vllm" else "float32",
            "threads": torch.get_num_threads(), "responses_per_s": round(len(texts) / wall, 2)}


def measure(engine: str, n: int, args) -> dict:
    import torch

    from rlhf_lightning.config import GenerationConfig, PolicyConfig, RLHFConfig
    from rlhf_lightning.models import loading
    from rlhf_lightning.models.generation import sample

    model_ref = args.model or RLHFConfig().policy.model
    tok = loading.load_tokenizer(model_ref)
    policy = loading.load_policy(PolicyConfig(model=model_ref), trainable=False).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
    chats = prompts(tok, n)
    stops = loading.stop_token_ids(policy, tok)
    start_s = 0.0
    t0 = time.perf_counter()
    if engine == "hf":
        tokens = 0
        for i in range(0, n, 64):
            out = sample(policy, tok, chats[i : i + 64], max_new_tokens=args.max_new_tokens, temperature=0.7, seed=i)
            tokens += int(out.response_mask.sum())
    else:
        from rlhf_lightning.models.engines import VLLMEngine

        eng = VLLMEngine(loading.resolve_model(model_ref), GenerationConfig(backend="vllm", dtype=args.dtype),
                         lora_rank=8, max_model_len=512, seed=0)
        eng.sync(policy)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = eng.sample(tok, chats, max_new_tokens=args.max_new_tokens, temperature=0.7, seed=0, stop_ids=stops)
        tokens = int(out.response_mask.sum())
    wall = time.perf_counter() - t0  # the engine's shutdown (seconds) is not generation
    if engine == "vllm":
        eng.close()
    return {"engine": engine, "prompts": n, "tokens": tokens, "wall_s": round(wall, 2),
            "tok_per_s": round(tokens / wall, 1), "start_s": round(start_s, 1),
            "dtype": args.dtype if engine == "vllm" else "float32", "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--prompts", default="64,4096", help="prompt counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="vLLM's generation.dtype (auto: bf16 on a CPU with native bf16, else float32)")
    ap.add_argument("--model", default="", help="policy.model (default: the default run's)")
    ap.add_argument("--workload", choices=["tokens", "builtin"], default="tokens")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        result = measure_builtin(args.run, args) if args.workload == "builtin" else measure(args.run, args.n, args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.workload == "builtin":
        args.prompts = "4096"
    results: dict[tuple[str, int], list[dict]] = {}
    engines = args.engines.split(",")
    for n in (int(x) for x in args.prompts.split(",")):
        for r in range(args.rounds):
            for engine in (engines if r % 2 == 0 else engines[::-1]):
                cmd = [sys.executable, __file__, "--run", engine, "--n", str(n), "--max-new-tokens",
                       str(args.max_new_tokens), "--dtype", args.dtype, "--model", args.model,
                       "--workload", args.workload]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"[{engine} n={n}] failed:\n{done.stderr[-3000:]}", flush=True)
                    return 1
                res = json.loads(line.removeprefix("RESULT "))
                results.setdefault((engine, n), []).append(res)
                if args.workload == "builtin":
                    print(f"  round {r + 1} {engine:5s}: {res['prompts']} responses in {res['wall_s']} s", flush=True)
                else:
                    print(f"  round {r + 1} {engine:5s} n={n}: {res['tok_per_s']} tok/s ({res['tokens']} tokens in "
                          f"{res['wall_s']} s; engine start {res['start_s']} s)", flush=True)
        key = "responses_per_s" if args.workload == "builtin" else "tok_per_s"
        med = {e: round(statistics.median(x[key] for x in results[(e, n)]), 2) for e in engines}
        ratio = f" vllm/hf={med['vllm'] / med['hf']:.2f}" if {"hf", "vllm"} <= set(med) else ""
        print(f"SUMMARY engines workload={args.workload} prompts={n} "
              + " ".join(f"{e}_{key}={v}" for e, v in med.items()) + ratio, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
