"""Statistics of the evaluation figures: win rates with cluster-robust intervals, paired differences,
distinct-n.

Pure Python on lists of numbers and texts; imported by the reward model (its held-out accuracy interval)
and by the evaluation.
"""

from __future__ import annotations

import math


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


def mean_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the paired differences a - b and its 95% normal-approximation half-width (nan for one pair)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, 1.96 * math.sqrt(var / len(d))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all responses (Li et al. 2016), on lower-cased words:
    falls when a policy collapses onto a few phrasings."""
    grams = [tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
