"""The quality gates: before RL (`check_reward_model`) and before promotion (`promotion_decision`).

Pure functions of the measured figures, so that the pipeline, the CLI and the tests decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass


class GateError(RuntimeError):
    """A quality gate failed; the message says which numbers failed and what to try."""


def check_reward_model(metrics: dict[str, float], min_accuracy: float, n_pairs: int, published: str = "") -> None:
    """Gate before RL: raise GateError unless the held-out preference accuracy reaches `min_accuracy`.
    `published`: the reward model was not trained here but loaded as published (its reference)."""
    accuracy = metrics["eval_accuracy"]
    if accuracy >= min_accuracy:
        return
    ci = metrics.get("eval_accuracy_ci95")
    failed = (f"reward model gate failed: held-out accuracy {accuracy:.3f}{f' ± {ci:.3f}' if ci is not None else ''} "
              f"< reward_model.min_eval_accuracy {min_accuracy:.3f} (on {n_pairs} pairs). PPO against this reward model "
              "would optimise noise, so the run stops before RL.")
    if published:
        raise GateError(
            f"{failed} {published} (reward_model.pretrained) disagrees with these pairs' labels. Check how it reads "
            "them (reward_model.input: chat or pair; reward_model.max_length, which may cut what it judges); try "
            "another reward model, or keep it out of the reward (reward.model_weight: 0) and maximise reward "
            "functions. Lower the gate only knowingly.")
    raise GateError(
        f"{failed} Try: more preference pairs (data.builtin.n_preference_prompts or more files); "
        "more epochs or another learning rate (reward_model.epochs, reward_model.learning_rate); less label "
        "noise (data.builtin.annotator_beta, or check your labels: random or flipped `choice` values give "
        "~0.5); a stronger backbone (reward_model.backbone, e.g. `policy`). Lower the gate only knowingly."
    )


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    judge: str
    """`gold`, `rm` or `reward`: whose win rates decided."""


def promotion_decision(metrics: dict[str, float], margin: float, judge: str,
                       champion: str | None = None, served_max_drop: float | None = None) -> GateDecision:
    """Gate before promotion: the policy's win rate against the reference, and against the champion when
    one was compared (`champion` names it), must exceed 0.5 + margin, and its 95% interval must lie above
    0.5 (a tie). Judged by `judge`'s win rates: `gold`, the gold judge, where there is one; else `rm`, the
    reward model, where it is the whole reward, or `reward`, the weighted total of the reward terms (both
    what the policy was trained on: a weaker test, unless the terms are exact checks such as a
    reference answer's). `metrics` are the evaluation's (`eval/...`).

    Where the served form of the policy differs from the evaluated one (a 4-bit run: `eval/served_rm_gap`,
    the served minus the evaluated greedy answers' reward, in the reward model's standard deviations) and
    `served_max_drop` is set, the served answers must not be worse by more than `served_max_drop` with a
    95% interval that excludes no difference: what would be served is then not what passed."""
    judge_name = judge
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
    if served_max_drop is not None and "eval/served_rm_gap" in metrics:
        gap, ci = metrics["eval/served_rm_gap"], metrics["eval/served_rm_gap_ci95"]
        worse = gap < -served_max_drop and gap + ci < 0  # nan interval (one prompt): not shown worse
        ok &= not worse
        parts.append(f"served vs evaluated reward {gap:+.2f} ± {ci:.2f} std "
                     + (f"< -{served_max_drop:.2f}: the served model answers worse than the one evaluated"
                        if worse else f"(allowed down to -{served_max_drop:.2f})"))
    verdict = "promote to champion" if ok else "stays candidate"
    reason = (f"{judge_name} win rate {'; '.join(parts)} (n={int(metrics['eval/n'])}, "
              f"KL {metrics['eval/kl']:.2f} nats): {verdict}")
    return GateDecision(ok, reason, judge_name)
