"""Policy vs reference on held-out prompts the policy never trained on.

Both models sample with the same seeds (the reference is the policy with its adapter disabled), at
temperature `evaluation.temperature` (1.0 by default: the distribution PPO optimised, and the one the
KL is measured on). Reported:
- gold score of each (the judge the reward model never saw) and the gold win rate of policy over reference,
- learned-reward win rate (what PPO optimised; a gap to the gold win rate is over-optimisation),
- KL(policy || reference) per sequence and per token, estimated on the policy's samples,
- response lengths.
Win rates count a tie as half a win and carry a 95% normal-approximation interval.
"""

from __future__ import annotations

import math
from statistics import fmean
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from rlhf_lightning import judge
from rlhf_lightning.config import RLHFConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    promote: bool
    reason: str
    samples: list[dict] = field(default_factory=list)


def win_rate(a: list[float], b: list[float]) -> tuple[float, float]:
    """Share of pairs where a beats b (ties count half) and its 95% half-width."""
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    p = sum(wins) / len(wins)
    return p, 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / len(wins))


def evaluate(cfg: RLHFConfig, eval_prompts: list[dict], adapter_dir: str, reward_model_dir: str) -> EvalResult:
    from rlhf_lightning.models.generation import sample
    from rlhf_lightning.models.loading import load_policy, load_tokenizer
    from rlhf_lightning.models.ppo import sequence_logprobs
    from rlhf_lightning.models.reward_model import RewardScorer

    ev = cfg.evaluation
    tok = load_tokenizer(cfg.policy.model)
    policy = load_policy(cfg.policy, adapter_dir, trainable=False)
    policy.eval()
    scorer = RewardScorer.load(reward_model_dir)

    rows = [r for r in eval_prompts for _ in range(ev.samples_per_prompt)]
    pol_text, ref_text, seq_kl, n_tokens, pol_len, ref_len = [], [], [], [], [], []
    bs = ev.batch_size
    for i in tqdm(range(0, len(rows), bs), desc="evaluate", unit="batch"):
        chats = [r["prompt_chat"] for r in rows[i : i + bs]]
        seed = ev.seed * 100_003 + i
        s = sample(policy, tok, chats, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, seed=seed)
        with policy.disable_adapter():
            r = sample(policy, tok, chats, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, seed=seed)
            with torch.no_grad():
                ref_logp = sequence_logprobs(policy, s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask,
                                             temperature=ev.temperature)  # (B, R)
        with torch.no_grad():
            pol_logp = sequence_logprobs(policy, s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask,
                                         temperature=ev.temperature)  # (B, R)
        seq_kl += ((pol_logp - ref_logp) * s.response_mask).sum(-1).tolist()  # (B,)
        n_tokens += s.response_mask.sum(-1).tolist()
        pol_len += s.response_mask.sum(-1).tolist()
        ref_len += r.response_mask.sum(-1).tolist()
        pol_text += s.texts
        ref_text += r.texts

    prompts = [r["prompt"] for r in rows]
    pol_gold, ref_gold = judge.gold_scores(pol_text), judge.gold_scores(ref_text)
    pol_rm = scorer.score(prompts, pol_text).tolist()
    ref_rm = scorer.score(prompts, ref_text).tolist()
    gold_wr, gold_ci = win_rate(pol_gold, ref_gold)
    rm_wr, rm_ci = win_rate(pol_rm, ref_rm)
    metrics = {
        "eval/gold_win_rate": gold_wr,
        "eval/gold_win_rate_ci95": gold_ci,
        "eval/rm_win_rate": rm_wr,
        "eval/rm_win_rate_ci95": rm_ci,
        "eval/gold_score": fmean(pol_gold),
        "eval/ref_gold_score": fmean(ref_gold),
        "eval/rm_score": fmean(pol_rm),
        "eval/ref_rm_score": fmean(ref_rm),
        "eval/kl": fmean(seq_kl),
        "eval/kl_per_token": sum(seq_kl) / max(sum(n_tokens), 1),
        "eval/response_length": fmean(pol_len),
        "eval/ref_response_length": fmean(ref_len),
        "eval/n": float(len(rows)),
    }
    threshold = 0.5 + ev.promotion_margin
    promote = gold_wr > threshold
    verdict = "promote to champion" if promote else "stays candidate"
    reason = (f"gold win rate {gold_wr:.3f} ± {gold_ci:.3f} vs threshold {threshold:.3f} "
              f"(n={len(rows)}, KL {metrics['eval/kl']:.2f} nats): {verdict}")
    samples = [
        {"prompt": p, "policy": a, "reference": b, "policy_gold": ga, "reference_gold": gb}
        for p, a, b, ga, gb in list(zip(prompts, pol_text, ref_text, pol_gold, ref_gold))[:32]
    ]
    return EvalResult(metrics=metrics, promote=promote, reason=reason, samples=samples)
