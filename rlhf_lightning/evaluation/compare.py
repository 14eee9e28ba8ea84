"""Policy vs reference (and vs the current champion) on held-out prompts.

Every model samples the same prompts with the same seeds, at temperature `evaluation.temperature`
(1.0 by default: the distribution PPO optimised, and the one the KL is measured on). The reference is
the policy with its adapter disabled; the champion is the registry's `champion` adapter loaded beside
the policy's on the same base weights. Reported (`eval/...`):
- learned reward (`rm_score`, where there is a reward model), gold score (`gold_score`, where a gold judge
  exists: the built-in task), the total reward PPO maximised (`reward`) and each reward function's mean
  (`reward/<name>`) of each model, and win rates of the policy by each judge, with a 95% interval;
- KL(policy || reference) per sequence (`kl`) and per token (`kl_per_token`) on the policy's samples;
- response length, share of responses that end with an end token, distinct-1/2.
A gap between the learned-reward and the gold win rate is over-optimisation of the reward model.

A 4-bit run is evaluated on its nf4 base but served from the base in full precision with the adapter
merged (`served_policy`); `served_check` has both answer the same prompts greedily and reports how alike
they answer (`eval/served_...`), which the promotion gate reads.

`evaluate` ends with the promotion gate (`gates.promotion_decision`); `monitor.HeldoutMonitor` runs
`compare` on a few held-out prompts during PPO, for the over-optimisation curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass, field
from statistics import fmean

import torch

from rlhf_lightning import hardware, judge
from rlhf_lightning.config import RLHFConfig
from rlhf_lightning.evaluation.gates import promotion_decision
from rlhf_lightning.models.generation import length_sorted_batches, sample
from rlhf_lightning.models.loading import (compute_device, load_policy, policy_tokenizer, resolve_model,
                                           stop_token_ids, to_compute_device)
from rlhf_lightning.models.logprobs import ended_with_eos, sequence_logprobs
from rlhf_lightning.models.losses import per_token_kl
from rlhf_lightning.models.rewards import MODEL_TERM, Rewards
from rlhf_lightning.stats import distinct_n, mean_difference, win_rate

CHAMPION_ADAPTER = "champion"


@dataclass
class EvalResult:
    metrics: dict[str, float]
    promote: bool
    reason: str
    samples: list[dict] = field(default_factory=list)
    served: list[dict] = field(default_factory=list)
    """A 4-bit run's served-vs-evaluated greedy answers (`served_check`); empty otherwise."""


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


def engine_arm(engine, policy, name: str) -> bool:
    """Point `engine` at model `name` (the policy's adapter, the champion's, or none for the reference);
    whether the engine samples with an adapter."""
    if name == "reference":
        return False
    engine.sync(policy, adapter_name="default" if name == "policy" else CHAMPION_ADAPTER)
    return True


@torch.no_grad()
def generate(policy, tokenizer, chats: list[str], name: str, *, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int, with_kl: bool = False, engine=None,
             batches: list[tuple[int, list[int]]] | None = None) -> Responses:
    """Sample from model `name` in batches seeded by position, so every model sees the same random
    stream; with `with_kl` also the sequence KL to the reference on the sampled tokens (always the
    trainer's log-probs). `engine` (a VLLMEngine): it samples instead of HF `generate`, every prompt in
    one call, row r seeded by itself, so every model still sees the same seeds. `batches`: only these of
    the rows' length-sorted batches (a device's share; the other rows stay empty), seeded as in the whole."""
    n = len(chats)
    out = Responses([""] * n, [0] * n, [False] * n, [0.0] * n if with_kl else [])
    device = next(policy.parameters()).device
    stops = stop_token_ids(policy, tokenizer)
    if batches is None:
        batches = length_sorted_batches(tokenizer, chats, batch_size)
    if engine is not None:  # every prompt in one request list, each row seeded by its position
        with_adapter = engine_arm(engine, policy, name)
        mine = [r for _, rows in batches for r in rows]
        local = {r: j for j, r in enumerate(mine)}
        engine_batches = engine.sample_batches(tokenizer, [chats[r] for r in mine],
                                               [[local[r] for r in rows] for _, rows in batches],
                                               max_new_tokens=max_new_tokens, temperature=temperature,
                                               seed=[seed * 100_003 + r for r in mine], stop_ids=stops,
                                               adapter=with_adapter, device=device)
    for k, (i, rows) in enumerate(batches):
        with active_model(policy, name):
            if engine is not None:
                s = engine_batches[k]
            else:
                s = sample(policy, tokenizer, [chats[r] for r in rows], max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed * 100_003 + i)
            if with_kl:
                inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.response_mask)
                logp = sequence_logprobs(policy, *inputs, temperature=temperature)  # (b, R)
        if with_kl:
            with active_model(policy, "reference"):
                ref_logp = sequence_logprobs(policy, *inputs, temperature=temperature)  # (b, R)
            for r, kl in zip(rows, (per_token_kl(logp, ref_logp) * s.response_mask).sum(-1).tolist()):  # (b,)
                out.seq_kl[r] = kl
        for r, text, length, ended in zip(rows, s.texts, s.response_mask.sum(-1).tolist(),
                                          ended_with_eos(s, stops).tolist()):
            out.texts[r], out.lengths[r], out.ended[r] = text, length, ended
    return out


Scores = dict[str, dict[str, list[float]]]
"""{model: {reward term: one raw value per row}} (`Rewards.score`'s terms)."""


def compare(policy, tokenizer, rewards: Rewards, rows: list[dict], *, max_new_tokens: int, temperature: float,
            batch_size: int, seed: int, gold: bool, champion: bool = False,
            prefix: str = "eval/", engine=None) -> tuple[dict[str, float], list[dict]]:
    """Sample policy, reference (and champion) on `rows` (`prompt`, `prompt_chat`, `extra`); return the
    metrics and the paired samples. `gold`: score with the gold judge too. `engine`: a VLLMEngine samples."""
    arms, scores = sample_and_score(policy, tokenizer, rewards, rows, max_new_tokens=max_new_tokens,
                                    temperature=temperature, batch_size=batch_size, seed=seed, champion=champion,
                                    engine=engine)
    return summarise(arms, scores, rows, rewards, gold=gold, prefix=prefix)


def sample_and_score(policy, tokenizer, rewards: Rewards, rows: list[dict], *, max_new_tokens: int,
                     temperature: float, batch_size: int, seed: int, champion: bool = False, engine=None,
                     batches: list[tuple[int, list[int]]] | None = None) -> tuple[dict[str, Responses], Scores]:
    """Every model's responses to `rows` and each reward term's values of them: ({model: Responses},
    {model: {term: values}}). `batches`: only these of the rows' length-sorted batches (`generate`); the
    other rows' entries stay empty (value 0.0)."""
    if batches is not None and not batches:
        raise ValueError("sample_and_score: an empty share of batches (give each device one at least)")
    policy.eval()
    chats, prompts = [r["prompt_chat"] for r in rows], [r["prompt"] for r in rows]
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed,
              engine=engine, batches=batches)
    arms = {"policy": generate(policy, tokenizer, chats, "policy", with_kl=True, **kw),
            "reference": generate(policy, tokenizer, chats, "reference", **kw)}
    if champion:
        arms["champion"] = generate(policy, tokenizer, chats, "champion", **kw)
    mine = sorted(r for _, rs in batches for r in rs) if batches is not None else list(range(len(rows)))
    scores: Scores = {}
    for name, r in arms.items():
        got = rewards.score([prompts[i] for i in mine], [r.texts[i] for i in mine], [rows[i] for i in mine])
        scores[name] = {term: [0.0] * len(rows) for term in got}
        for term, values in got.items():
            for i, value in zip(mine, values.tolist()):
                scores[name][term][i] = value
    return arms, scores


def judge_of(rewards: Rewards, gold: bool) -> str:
    """Whose win rates decide promotion (`gates.promotion_decision`): the gold judge where there is one,
    else the reward model where it is the whole reward, else the weighted total of the terms."""
    return "gold" if gold else "rm" if rewards.model_only else "reward"


def summarise(arms: dict[str, Responses], scores: Scores, rows: list[dict], rewards: Rewards, *, gold: bool,
              prefix: str = "eval/") -> tuple[dict[str, float], list[dict]]:
    """`compare`'s metrics and paired samples from every model's responses and reward terms' values."""
    prompts = [r["prompt"] for r in rows]
    golds = {name: judge.gold_scores(r.texts) for name, r in arms.items()} if gold else {}
    totals = {name: rewards.total({t: torch.tensor(v) for t, v in terms.items()}).tolist()
              for name, terms in scores.items()}
    rm = {name: terms[MODEL_TERM] for name, terms in scores.items() if MODEL_TERM in terms}

    pol = arms["policy"]
    m: dict[str, float] = {
        "kl": fmean(pol.seq_kl),
        "kl_per_token": sum(pol.seq_kl) / max(sum(pol.lengths), 1),
        "n": float(len(rows)),
    }
    short = {"policy": "", "reference": "ref_", "champion": "champion_"}
    for name, r in arms.items():
        p = short[name]
        m[f"{p}reward"] = fmean(totals[name])
        for fn in rewards.functions:
            m[f"{p}reward/{fn.name}"] = fmean(scores[name][fn.name])
        if rm:
            m[f"{p}rm_score"] = fmean(rm[name])
            m[f"{p}rm_score_normalised"] = rewards.scorer.normalise(torch.tensor(rm[name])).mean().item()
        if gold:
            m[f"{p}gold_score"] = fmean(golds[name])
        m[f"{p}response_length"] = fmean(r.lengths)
        m[f"{p}eos_rate"] = fmean(map(float, r.ended))
        m[f"{p}distinct_1"] = distinct_n(r.texts, 1)
        m[f"{p}distinct_2"] = distinct_n(r.texts, 2)
    for other, p in (("reference", ""), ("champion", "champion_")):
        if other not in arms:
            continue
        judges = (([("rm", rm)] if rm else []) + ([("reward", totals)] if not rewards.model_only else [])
                  + ([("gold", golds)] if gold else []))
        for judge_name, by_arm in judges:
            wr, ci = win_rate(by_arm["policy"], by_arm[other], groups=prompts)
            m[f"{p}{judge_name}_win_rate"], m[f"{p}{judge_name}_win_rate_ci95"] = wr, ci

    samples = []  # every evaluated answer (side_by_side picks the ones to show)
    for i in range(len(rows)):
        row = {"prompt": prompts[i]}
        for name, r in arms.items():
            row[name] = r.texts[i]
            if not rewards.model_only:
                row[f"{name}_reward"] = totals[name][i]
                row |= {f"{name}_reward/{fn.name}": scores[name][fn.name][i] for fn in rewards.functions}
            if rm:
                row[f"{name}_rm"] = rm[name][i]
            if gold:
                row[f"{name}_gold"] = golds[name][i]
        samples.append(row)
    return {f"{prefix}{k}": v for k, v in m.items()}, samples


def served_policy(policy_cfg, adapter_dir: str, accelerator: str = "auto") -> torch.nn.Module:
    """The model the registered version serves for `adapter_dir` (pyfunc_model.RLHFPolicyModel): the base
    unquantised in the serving dtype (bf16 on a GPU with it, fp16 on older GPUs, fp32 on the CPU:
    `policy.dtype: auto`), the adapter merged into it."""
    served = dataclasses.replace(policy_cfg, quantization="none", dtype="auto")
    model = load_policy(served, adapter_dir, trainable=False).merge_and_unload().eval()
    return to_compute_device(model, accelerator)


def served_agreement(evaluated: list[str], served: list[str], evaluated_rm: list[float],
                     served_rm: list[float], rm_std: float) -> dict[str, float]:
    """How alike the served and the evaluated model answer the same prompts greedily: the share of
    identical answers, each one's mean reward, and the paired reward difference served - evaluated divided
    by `rm_std` (1 for rewards already normalised) with its 95% half-width."""
    gap, ci = mean_difference(served_rm, evaluated_rm)
    return {
        "served_greedy_match": fmean(float(a == b) for a, b in zip(evaluated, served)),
        "served_rm_score": fmean(served_rm),
        "evaluated_greedy_rm_score": fmean(evaluated_rm),
        "served_rm_gap": gap / rm_std,
        "served_rm_gap_ci95": ci / rm_std,
        "served_n": float(len(served)),
    }


def greedy_kwargs(cfg: RLHFConfig) -> dict:
    return dict(max_new_tokens=cfg.evaluation.max_new_tokens, temperature=0.0, batch_size=cfg.evaluation.batch_size,
                seed=cfg.evaluation.seed)


def served_check(cfg: RLHFConfig, tokenizer, rewards: Rewards, rows: list[dict], evaluated: list[str],
                 adapter_dir: str, prefix: str = "eval/") -> tuple[dict[str, float], list[dict]]:
    """The served form of the adapter (`served_policy`) answers `rows` greedily beside `evaluated`, the
    evaluated model's greedy answers to them; both given the total reward (the reward model's score
    normalised, plus the reward functions, weighted: in the reward model's standard deviations when it is
    the whole reward). Returns the metrics (`served_agreement`) and the answers side by side."""
    chats, prompts = [r["prompt_chat"] for r in rows], [r["prompt"] for r in rows]
    served_model = served_policy(cfg.policy, adapter_dir, cfg.trainer.accelerator)
    served = generate(served_model, tokenizer, chats, "policy", **greedy_kwargs(cfg)).texts
    del served_model
    evaluated_rm, served_rm = (rewards.total(rewards.score(prompts, texts, rows)).tolist() for texts in (evaluated, served))
    m = served_agreement(evaluated, served, evaluated_rm, served_rm, 1.0)
    table = [{"prompt": p, "evaluated": e, "served": s_, "reward evaluated": round(er, 3), "reward served": round(sr, 3)}
             for p, e, s_, er, sr in zip(prompts, evaluated, served, evaluated_rm, served_rm)]
    return {f"{prefix}{k}": v for k, v in m.items()}, table


def side_by_side(samples: list[dict], n: int = 5) -> list[dict]:
    """What the tuned policy now says next to what the reference said, for people to read: the `n`
    answers where the policy gained most over the reference, the `n` where it lost most (by the gold
    judge when there is one, else by the total reward), then the first `n` others as they came.
    Rows: {case, prompt, reference, policy, then for each judge (gold when there is one, the total reward
    when it is more than the reward model's score, rm when there is a reward model): <judge> reference,
    <judge> policy, <judge> gain}."""
    if not samples:
        return []
    judges = [j for j in ("gold", "reward", "rm") if f"policy_{j}" in samples[0]]
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


# ---------------------------------------------------------------- entry points


def load_rewards(cfg: RLHFConfig, reward_model_dir: str | None) -> Rewards:
    """The run's reward terms (`cfg.reward`), the reward model on this process's device."""
    return Rewards.load(cfg.reward, reward_model_dir).to(compute_device(cfg.trainer.accelerator))


def _models(cfg: RLHFConfig, adapter_dir: str, reward_model_dir: str | None, champion: tuple[str, str] | None):
    """The policy (its adapter, and the champion's beside it) and the reward terms on this process's
    device, and a vLLM engine there under `generation.backend: vllm` (else None)."""
    policy = load_policy(cfg.policy, adapter_dir, trainable=False)
    if champion is not None:
        policy.load_adapter(champion[0], adapter_name=CHAMPION_ADAPTER)
    # Sampling 3 models x every held-out prompt: on the GPU when the step has one.
    policy = to_compute_device(policy, cfg.trainer.accelerator, quantized=cfg.policy.quantization == "4bit")
    rewards = load_rewards(cfg, reward_model_dir)
    engine = None
    if cfg.generation.backend == "vllm":
        from rlhf_lightning.models.engines import VLLMEngine

        engine = VLLMEngine(resolve_model(cfg.policy.model), cfg.generation, lora_rank=cfg.policy.lora.r,
                            seed=cfg.evaluation.seed)
    return policy, rewards, engine


def sample_share(cfg: RLHFConfig, rows: list[dict], adapter_dir: str, reward_model_dir: str | None,
                 champion: tuple[str, str] | None, batches: list[tuple[int, list[int]]] | None
                 ) -> tuple[dict[str, Responses], Scores]:
    """`sample_and_score` of `batches` (all of them for None) with models loaded here: one device's share of
    the evaluation, in a process of its own when the step has several (`hardware.over_devices`)."""
    ev = cfg.evaluation
    policy, rewards, engine = _models(cfg, adapter_dir, reward_model_dir, champion)
    try:
        return sample_and_score(policy, policy_tokenizer(cfg.policy), rewards, rows, max_new_tokens=ev.max_new_tokens,
                                temperature=ev.temperature, batch_size=ev.batch_size, seed=ev.seed,
                                champion=champion is not None, engine=engine, batches=batches)
    finally:
        if engine is not None:
            engine.close()


def merge_shares(shares: list[tuple[dict[str, Responses], Scores]],
                 batches: list[list[tuple[int, list[int]]]]) -> tuple[dict[str, Responses], Scores]:
    """The devices' shares (`sample_share` of `batches[d]` on device d) as one sample of every row."""
    arms, scores = shares[0]
    for (share_arms, share_scores), share_batches in zip(shares[1:], batches[1:]):
        for r in (r for _, rs in share_batches for r in rs):
            for name, responses in share_arms.items():
                for field_name in ("texts", "lengths", "ended", "seq_kl"):
                    values = getattr(responses, field_name)
                    if values:
                        getattr(arms[name], field_name)[r] = values[r]
                for term, values in share_scores[name].items():
                    scores[name][term][r] = values[r]
    return arms, scores


def evaluate(cfg: RLHFConfig, eval_prompts: list[dict], adapter_dir: str, reward_model_dir: str | None,
             champion: tuple[str, str] | None = None) -> EvalResult:
    """Compare the adapter in `adapter_dir` with its reference (and with `champion` = (adapter dir,
    label), on the same base) on every held-out prompt, `evaluation.samples_per_prompt` times; decide
    promotion. On every device the step has (`trainer.devices` GPUs, or CPU processes; at most one per
    batch): each samples and scores its share of the rows' batches, seeded as one device seeds them, so
    the result is one device's (exactly with HF on a CPU; on a GPU up to the last bits that kernels give
    batches of other rows, which the reward model's scores and vLLM's sampling may show)."""
    ev = cfg.evaluation
    tok = policy_tokenizer(cfg.policy)
    gold = judge.has_gold_judge(cfg)
    prompts = eval_prompts[: ev.max_prompts] if ev.max_prompts else eval_prompts
    rows = [r for r in prompts for _ in range(ev.samples_per_prompt)]
    devices = hardware.local_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    policy = None
    if devices > 1:
        every = length_sorted_batches(tok, [r["prompt_chat"] for r in rows], ev.batch_size)
        devices = min(devices, len(every))  # a device with no batch would load its models for nothing
    if devices > 1:
        shares = [every[d::devices] for d in range(devices)]
        print(f"evaluation: {len(rows)} rows sampled on {devices} devices at once", flush=True)
        arms, scores = merge_shares(hardware.over_devices(
            sample_share, [(cfg, rows, adapter_dir, reward_model_dir, champion, share) for share in shares],
            cfg.trainer.accelerator), shares)
        rewards = load_rewards(cfg, reward_model_dir)
    else:
        policy, rewards, engine = _models(cfg, adapter_dir, reward_model_dir, champion)
        try:
            arms, scores = sample_and_score(policy, tok, rewards, rows, max_new_tokens=ev.max_new_tokens,
                                        temperature=ev.temperature, batch_size=ev.batch_size, seed=ev.seed,
                                        champion=champion is not None, engine=engine)
        finally:
            if engine is not None:
                engine.close()
    metrics, samples = summarise(arms, scores, rows, rewards, gold=gold)
    served: list[dict] = []
    check_rows = prompts[: ev.served_check_prompts] if cfg.policy.quantization == "4bit" else []
    if check_rows and policy is None:
        policy = to_compute_device(load_policy(cfg.policy, adapter_dir, trainable=False), cfg.trainer.accelerator,
                                   quantized=True)
    evaluated = (generate(policy, tok, [r["prompt_chat"] for r in check_rows], "policy", **greedy_kwargs(cfg)).texts
                 if check_rows else [])
    # One base in memory at a time: the nf4 model goes before the served one loads.
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if check_rows:
        served_metrics, served = served_check(cfg, tok, rewards, check_rows, evaluated, adapter_dir)
        metrics |= served_metrics
    decision = promotion_decision(metrics, ev.promotion_margin, judge_of(rewards, gold), champion[1] if champion else None,
                                  served_max_drop=ev.served_max_rm_drop)
    return EvalResult(metrics=metrics, promote=decision.promote, reason=decision.reason, samples=samples,
                      served=served)
