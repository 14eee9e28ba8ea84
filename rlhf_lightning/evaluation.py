"""Policy vs reference (and vs the current champion) on held-out prompts, and the quality gates.

Every model samples the same prompts with the same seeds, at temperature `evaluation.temperature`
(1.0 by default: the distribution PPO optimised, and the one the KL is measured on). The reference is
the policy with its adapter disabled; the champion is the registry's `champion` adapter loaded beside
the policy's on the same base weights. Reported (`eval/...`):
- learned reward (`rm_score`) and gold score (`gold_score`, where a gold judge exists: the built-in
  task) of each model, and win rates of the policy by both judges, with a 95% interval;
- KL(policy || reference) per sequence (`kl`) and per token (`kl_per_token`) on the policy's samples;
- response length, share of responses that end with an end token, distinct-1/2.
A gap between the learned-reward and the gold win rate is over-optimisation of the reward model.

Gates: `check_reward_model` (before RL) raises `GateError`; `promotion_decision` (before promotion)
says whether the policy beats the reference and the champion by `evaluation.promotion_margin`.
`HeldoutMonitor` runs the same comparison on a few held-out prompts during PPO, for the
over-optimisation curve (`overoptimisation_figure`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from statistics import fmean

import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lightning import judge
from rlhf_lightning.config import EvaluationConfig, RLHFConfig

CHAMPION_ADAPTER = "champion"


class GateError(RuntimeError):
    """A quality gate failed; the message says which numbers failed and what to try."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    promote: bool
    reason: str
    samples: list[dict] = field(default_factory=list)


def has_gold_judge(cfg: RLHFConfig) -> bool:
    """The gold judge (rlhf_lightning.judge) is the built-in task's annotator; user data has none."""
    return not cfg.data.preferences


def win_rate(a: list[float], b: list[float], groups: list | None = None) -> tuple[float, float]:
    """Share of pairs where a beats b (ties count half) and its 95% normal-approximation half-width.

    `groups` (e.g. the prompt of each pair): pairs of one group are not independent — several samples
    of one prompt win or lose together — so the interval comes from the spread of the per-group win
    rates (a cluster-robust standard error) instead of treating every pair as independent."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win rate needs two equally long, non-empty score lists, got {len(a)} and {len(b)}")
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    p = sum(wins) / len(wins)
    if groups is None:
        return p, 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / len(wins))
    if len(groups) != len(wins):
        raise ValueError(f"win rate needs one group per pair, got {len(groups)} groups for {len(wins)} pairs")
    per_group: dict = {}
    for g, w in zip(groups, wins):
        per_group.setdefault(g, []).append(w)
    # Cluster totals around the overall rate (Liang-Zeger with a small-sample G/(G-1) factor): right
    # also when groups have different sizes.
    totals = [sum(ws) - p * len(ws) for ws in per_group.values()]
    k = len(totals)
    if k < 2:
        return p, float("nan")  # one cluster: no estimate of the spread between clusters
    var = k / (k - 1) * sum(t * t for t in totals) / len(wins) ** 2
    return p, 1.96 * math.sqrt(var)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all responses (Li et al. 2016), on lower-cased words:
    falls when a policy collapses onto a few phrasings."""
    grams = [tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------- sampling the models


@contextlib.contextmanager
def active_model(policy, name: str):
    """Make `policy` (a PeftModel) act as `policy`, `reference` (adapter disabled) or `champion`."""
    if name == "reference":
        with policy.disable_adapter():
            yield
    elif name == "policy":
        yield
    else:
        policy.set_adapter(CHAMPION_ADAPTER)
        try:
            yield
        finally:
            policy.set_adapter("default")


@dataclass
class Responses:
    """One model's responses to the evaluation rows."""

    texts: list[str]
    lengths: list[int]  # response tokens, the end token included
    ended: list[bool]  # stopped with an end token rather than at max_new_tokens
    seq_kl: list[float]  # KL(model || reference) of each response, on its own tokens (policy only)


@torch.no_grad()
def generate(policy, tokenizer, chats: list[str], name: str, *, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int, with_kl: bool = False) -> Responses:
    """Sample from model `name` in batches seeded by position, so every model sees the same random
    stream; with `with_kl` also the sequence KL to the reference on the sampled tokens."""
    from rlhf_lightning.models.generation import length_sorted_batches, sample
    from rlhf_lightning.models.ppo import ended_with_eos, sequence_logprobs

    n = len(chats)
    out = Responses([""] * n, [0] * n, [False] * n, [0.0] * n if with_kl else [])
    for i, rows in length_sorted_batches(tokenizer, chats, batch_size):
        with active_model(policy, name):
            s = sample(policy, tokenizer, [chats[r] for r in rows], max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed * 100_003 + i)
            if with_kl:
                inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask)
                logp = sequence_logprobs(policy, *inputs, temperature=temperature)  # (b, R)
        if with_kl:
            with active_model(policy, "reference"):
                ref_logp = sequence_logprobs(policy, *inputs, temperature=temperature)  # (b, R)
            for r, kl in zip(rows, ((logp - ref_logp) * s.response_mask).sum(-1).tolist()):  # (b,)
                out.seq_kl[r] = kl
        for r, text, length, ended in zip(rows, s.texts, s.response_mask.sum(-1).tolist(),
                                          ended_with_eos(s, tokenizer.eos_token_id).tolist()):
            out.texts[r], out.lengths[r], out.ended[r] = text, length, ended
    return out


def compare(policy, tokenizer, scorer, rows: list[dict], *, max_new_tokens: int, temperature: float,
            batch_size: int, seed: int, gold: bool, champion: bool = False,
            prefix: str = "eval/") -> tuple[dict[str, float], list[dict]]:
    """Sample policy, reference (and champion) on `rows` (`prompt`, `prompt_chat`); return the metrics
    and the paired samples. `gold`: score with the gold judge too."""
    policy.eval()
    chats, prompts = [r["prompt_chat"] for r in rows], [r["prompt"] for r in rows]
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    arms = {"policy": generate(policy, tokenizer, chats, "policy", with_kl=True, **kw),
            "reference": generate(policy, tokenizer, chats, "reference", **kw)}
    if champion:
        arms["champion"] = generate(policy, tokenizer, chats, "champion", **kw)
    rm = {name: scorer.score(prompts, r.texts).tolist() for name, r in arms.items()}
    golds = {name: judge.gold_scores(r.texts) for name, r in arms.items()} if gold else {}

    pol = arms["policy"]
    m: dict[str, float] = {
        "kl": fmean(pol.seq_kl),
        "kl_per_token": sum(pol.seq_kl) / max(sum(pol.lengths), 1),
        "n": float(len(rows)),
    }
    short = {"policy": "", "reference": "ref_", "champion": "champion_"}
    for name, r in arms.items():
        p = short[name]
        m[f"{p}rm_score"] = fmean(rm[name])
        m[f"{p}rm_score_normalised"] = scorer.normalise(torch.tensor(rm[name])).mean().item()
        if gold:
            m[f"{p}gold_score"] = fmean(golds[name])
        m[f"{p}response_length"] = fmean(r.lengths)
        m[f"{p}eos_rate"] = fmean(map(float, r.ended))
        m[f"{p}distinct_1"] = distinct_n(r.texts, 1)
        m[f"{p}distinct_2"] = distinct_n(r.texts, 2)
    for other, p in (("reference", ""), ("champion", "champion_")):
        if other not in arms:
            continue
        judges = [("rm", rm)] + ([("gold", golds)] if gold else [])
        for judge_name, scores in judges:
            wr, ci = win_rate(scores["policy"], scores[other], groups=prompts)
            m[f"{p}{judge_name}_win_rate"], m[f"{p}{judge_name}_win_rate_ci95"] = wr, ci

    samples = []  # every evaluated answer (side_by_side picks the ones to show)
    for i in range(len(rows)):
        row = {"prompt": prompts[i]}
        for name, r in arms.items():
            row[name] = r.texts[i]
            row[f"{name}_rm"] = rm[name][i]
            if gold:
                row[f"{name}_gold"] = golds[name][i]
        samples.append(row)
    return {f"{prefix}{k}": v for k, v in m.items()}, samples


def side_by_side(samples: list[dict], n: int = 5) -> list[dict]:
    """What the tuned policy now says next to what the reference said, for people to read: the `n`
    answers where the policy gained most over the reference, the `n` where it lost most (by the gold
    judge when there is one, else by the reward model), then the first `n` others as they came.
    Rows: {case, prompt, reference, policy, then for each judge (gold when there is one, rm): <judge>
    reference, <judge> policy, <judge> gain}."""
    judges = ["gold", "rm"] if samples and "policy_gold" in samples[0] else ["rm"]
    judge_name = judges[0]
    gain = [s[f"policy_{judge_name}"] - s[f"reference_{judge_name}"] for s in samples]  # decides the order
    order = sorted(range(len(samples)), key=lambda i: gain[i], reverse=True)
    best = order[:n]
    worst = [i for i in order[::-1][:n] if i not in best]
    rest = [i for i in range(len(samples)) if i not in best and i not in worst][:n]
    out = []
    for case, picked in (("best", best), ("worst", worst), ("sample", rest)):
        for i in picked:
            s = samples[i]
            row = {"case": case, "prompt": s["prompt"], "reference": s["reference"], "policy": s["policy"]}
            for j in judges:
                row |= {f"{j} reference": round(s[f"reference_{j}"], 3), f"{j} policy": round(s[f"policy_{j}"], 3),
                        f"{j} gain": round(s[f"policy_{j}"] - s[f"reference_{j}"], 3)}
            out.append(row)
    return out


def side_by_side_markdown(rows: list[dict]) -> str:
    """`side_by_side` rows as a Markdown table (a Metaflow card); cells kept on one line."""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- gates


def check_reward_model(metrics: dict[str, float], min_accuracy: float, n_pairs: int) -> None:
    """Gate before RL: raise GateError unless the held-out preference accuracy reaches `min_accuracy`."""
    accuracy = metrics["eval_accuracy"]
    if accuracy >= min_accuracy:
        return
    ci = metrics.get("eval_accuracy_ci95")
    raise GateError(
        f"reward model gate failed: held-out accuracy {accuracy:.3f}{f' ± {ci:.3f}' if ci is not None else ''} "
        f"< reward_model.min_eval_accuracy {min_accuracy:.3f} (on {n_pairs} pairs). PPO against this reward model would optimise noise, so the "
        "run stops before RL. Try: more preference pairs (data.builtin.n_preference_prompts or more files); "
        "more epochs or another learning rate (reward_model.epochs, reward_model.learning_rate); less label "
        "noise (data.builtin.annotator_beta, or check your labels: random or flipped `choice` values give "
        "~0.5); a stronger backbone (reward_model.backbone, e.g. `policy`). Lower the gate only knowingly."
    )


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    judge: str
    """`gold` or `rm`: whose win rates decided."""


def promotion_decision(metrics: dict[str, float], margin: float, gold: bool,
                       champion: str | None = None) -> GateDecision:
    """Gate before promotion: the policy's win rate against the reference, and against the champion when
    one was compared (`champion` names it), must exceed 0.5 + margin, and its 95% interval must lie above
    0.5 (a tie). Judged by the gold judge when
    there is one, else by the reward model (which the policy was trained on: a weaker test)."""
    judge_name = "gold" if gold else "rm"
    threshold = 0.5 + margin
    against = [("reference", "")] + ([(f"champion {champion}", "champion_")] if champion else [])
    parts, ok = [], True
    for who, p in against:
        wr, ci = metrics[f"eval/{p}{judge_name}_win_rate"], metrics[f"eval/{p}{judge_name}_win_rate_ci95"]
        # The interval must exclude a tie too: on few samples a policy no better than the reference can clear
        # the margin by chance (a tiny policy PPO moved against a random reward model: 0.562 +- 0.084 on 24).
        clear = wr - ci > 0.5
        ok &= wr > threshold and clear
        parts.append(f"vs {who} {wr:.3f} ± {ci:.3f} {'>' if wr > threshold else '<='} {threshold:.3f}"
                     + ("" if clear or wr <= threshold else " but its 95% interval reaches 0.5"))
    verdict = "promote to champion" if ok else "stays candidate"
    reason = (f"{judge_name} win rate {'; '.join(parts)} (n={int(metrics['eval/n'])}, "
              f"KL {metrics['eval/kl']:.2f} nats): {verdict}")
    return GateDecision(ok, reason, judge_name)


# ---------------------------------------------------------------- entry points


def evaluate(cfg: RLHFConfig, eval_prompts: list[dict], adapter_dir: str, reward_model_dir: str,
             champion: tuple[str, str] | None = None) -> EvalResult:
    """Compare the adapter in `adapter_dir` with its reference (and with `champion` = (adapter dir,
    label), on the same base) on every held-out prompt, `evaluation.samples_per_prompt` times; decide
    promotion."""
    from rlhf_lightning.models.loading import compute_device, load_policy, load_tokenizer, to_compute_device
    from rlhf_lightning.models.reward_model import RewardScorer

    ev = cfg.evaluation
    tok = load_tokenizer(cfg.policy.model)
    policy = load_policy(cfg.policy, adapter_dir, trainable=False)
    if champion is not None:
        policy.load_adapter(champion[0], adapter_name=CHAMPION_ADAPTER)
    # Sampling 3 models x every held-out prompt: on the GPU when the step has one.
    policy = to_compute_device(policy, cfg.trainer.accelerator, quantized=cfg.policy.quantization == "4bit")
    scorer = RewardScorer.load(reward_model_dir).to(compute_device(cfg.trainer.accelerator))
    gold = has_gold_judge(cfg)
    prompts = eval_prompts[: ev.max_prompts] if ev.max_prompts else eval_prompts
    rows = [r for r in prompts for _ in range(ev.samples_per_prompt)]
    metrics, samples = compare(policy, tok, scorer, rows, max_new_tokens=ev.max_new_tokens,
                               temperature=ev.temperature, batch_size=ev.batch_size, seed=ev.seed, gold=gold,
                               champion=champion is not None)
    decision = promotion_decision(metrics, ev.promotion_margin, gold, champion[1] if champion else None)
    return EvalResult(metrics=metrics, promote=decision.promote, reason=decision.reason, samples=samples)


class HeldoutMonitor(Callback):
    """During PPO, every `every_n_iterations` iterations and after the last: policy vs reference on a few
    held-out prompts (one sample each), logged as `heldout/...` and added to the iteration's history."""

    def __init__(self, rows: list[dict], ev: EvaluationConfig, gold: bool):
        if ev.every_n_iterations <= 0:
            raise ValueError("HeldoutMonitor needs evaluation.every_n_iterations > 0")
        self.rows, self.ev, self.gold = rows[: ev.monitor_prompts], ev, gold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last = batch_idx + 1 == trainer.num_training_batches
        if (batch_idx + 1) % self.ev.every_n_iterations and not last:
            return
        metrics, _ = compare(pl_module.policy, pl_module.tokenizer, pl_module.scorer, self.rows,
                             max_new_tokens=self.ev.max_new_tokens, temperature=self.ev.temperature,
                             batch_size=self.ev.batch_size, seed=self.ev.seed, gold=self.gold, prefix="heldout/")
        pl_module.history[-1].update(metrics)
        # Straight to the loggers, at the iteration: `log_dict` from a callback keeps the values in
        # Lightning's step results, which then re-logs them, stale, at every later iteration.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch_idx)


def overoptimisation_figure(history: list[dict]):
    """Left: gold score, learned reward (normalised: the scale PPO saw) and KL over the PPO iterations on
    one plot; rollouts as lines, the held-out monitor's evaluations as markers. Gold falling while the
    learned reward keeps rising is reward over-optimisation (Gao et al. 2023). Right, when the monitor
    ran: held-out win rates against the reference by both judges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = [h for h in history if "heldout/kl" in h]
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(12 if held else 7.5, 4.2), squeeze=False)
    ax = axes[0][0]
    it = [h["iteration"] + 1 for h in history]
    hx = [h["iteration"] + 1 for h in held]
    ax.plot(it, [h["ppo/reward_normalised"] for h in history], color="tab:blue", label="learned reward (rollouts)")
    if "ppo/gold_score" in history[0]:
        ax.plot(it, [h["ppo/gold_score"] for h in history], color="tab:green", label="gold score (rollouts)")
    if held:
        ax.plot(hx, [h["heldout/rm_score_normalised"] for h in held], "o", color="tab:blue",
                label="learned reward (held-out)")
        if "heldout/gold_score" in held[0]:
            ax.plot(hx, [h["heldout/gold_score"] for h in held], "s", color="tab:green", label="gold score (held-out)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("score")
    kl_ax = ax.twinx()
    kl_ax.plot(it, [h["ppo/kl"] for h in history], color="tab:red", label="KL to reference (rollouts)")
    if held:
        kl_ax.plot(hx, [h["heldout/kl"] for h in held], "^", color="tab:red", label="KL (held-out)")
    kl_ax.set_ylabel("KL (nats per sequence)", color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    kl_handles, kl_labels = kl_ax.get_legend_handles_labels()
    ax.legend(handles + kl_handles, labels + kl_labels, fontsize=7, loc="upper left")
    ax.set_title("Gold score, learned reward and KL over PPO")
    if held:
        wr = axes[0][1]
        for key, label in (("heldout/gold_win_rate", "gold judge"), ("heldout/rm_win_rate", "reward model")):
            if key in held[0]:
                wr.errorbar(hx, [h[key] for h in held], yerr=[h[key + "_ci95"] for h in held], marker="o",
                            capsize=3, label=label)
        wr.axhline(0.5, color="grey", lw=0.8, ls=":")
        wr.set_xlabel("PPO iteration")
        wr.set_ylabel("win rate vs reference (held-out)")
        wr.legend(fontsize=7)
    fig.tight_layout()
    return fig
