"""The gold judge of the built-in task: what the simulated annotator wants, and what evaluation measures.

gold(response) = VADER compound sentiment in [-1, 1]  -  degeneracy penalty in [0, 1]

VADER (vaderSentiment, MIT, lexicon bundled) rewards warm, positive wording. Alone it can be gamed by
word salad ("great great great") or by saying nothing, so the penalty charges for text that is too short,
repeats itself, or is mostly not words. The reward model never sees this function: it learns only from
the noisy pairwise labels drawn from it (see `annotate`).
"""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_lightning.config import RLHFConfig

_WORD = re.compile(r"[A-Za-z']+")


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def degeneracy_penalty(text: str) -> float:
    """0 for ordinary prose; up to 1 for empty, very short, repetitive or non-word text."""
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return 1.0
    # Share of word bigrams that repeat an earlier bigram: 0 for normal sentences, near 1 for loops.
    bigrams = list(zip(words, words[1:]))
    repeated = 1.0 - len(set(bigrams)) / len(bigrams)
    # Share of non-space characters that are not letters (code, emoji runs, punctuation spam).
    chars = [c for c in text if not c.isspace()]
    non_alpha = sum(not c.isalpha() for c in chars) / max(len(chars), 1)
    penalty = 2.0 * max(0.0, repeated - 0.1) + 2.0 * max(0.0, non_alpha - 0.25)
    return min(1.0, penalty)


def gold_score(text: str) -> float:
    """The gold reward of one response (higher is better), in [-2, 1]."""
    compound = _analyzer().polarity_scores(text)["compound"]
    return float(compound - degeneracy_penalty(text))


def gold_scores(texts: list[str]) -> list[float]:
    return [gold_score(t) for t in texts]


def preference_probability(gold_a: float, gold_b: float, beta: float) -> float:
    """Bradley-Terry annotator: P(a preferred over b) = sigmoid(beta * (gold_a - gold_b))."""
    return 1.0 / (1.0 + math.exp(-beta * (gold_a - gold_b)))


def annotate(gold_a: float, gold_b: float, beta: float, rng: random.Random) -> int:
    """Draw a noisy label as AlpacaFarm's simulated annotators do: 0 if `a` is preferred, else 1."""
    return 0 if rng.random() < preference_probability(gold_a, gold_b, beta) else 1


def rank(golds: list[float], beta: float, rng: random.Random) -> list[int]:
    """Draw a noisy ranking of several responses, best first, as an annotator who orders K answers at once
    (InstructGPT's labellers ranked 4-9): Plackett-Luce with weights exp(beta * gold), picked one place at a
    time with one uniform draw per place. For two responses it is `annotate`, draw for draw."""
    left = list(range(len(golds)))
    order = []
    while len(left) > 1:
        if len(left) == 2:  # the Bradley-Terry case: the pairwise annotator's own draw
            a, b = left
            first = a if annotate(golds[a], golds[b], beta, rng) == 0 else b
        else:
            top = max(beta * golds[i] for i in left)
            weights = [math.exp(beta * golds[i] - top) for i in left]  # shifted: no overflow
            u, acc = rng.random() * sum(weights), 0.0
            first = left[-1]
            for i, w in zip(left, weights):
                acc += w
                if u < acc:
                    first = i
                    break
        order.append(first)
        left.remove(first)
    return order + left


def ranking_pairs(order: list[int]) -> list[tuple[int, int, int]]:
    """Every pair of a ranking as (i, j, choice) with i < j in sample order and choice 0 if i ranks above j:
    the K(K-1)/2 preference rows one ranking of K responses gives."""
    place = {idx: pos for pos, idx in enumerate(order)}
    return [(i, j, 0 if place[i] < place[j] else 1) for i in range(len(order)) for j in range(i + 1, len(order))]


def has_gold_judge(cfg: RLHFConfig) -> bool:
    """The gold judge is the built-in task's annotator: a run on the user's own data has none."""
    return cfg.uses_builtin_task
