"""The built-in task's gold judge and simulated annotator."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from rlhf_lightning import judge


class Draws:
    """A stand-in for random.Random that returns the given uniforms in turn."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_degeneracy_penalty_by_hand():
    assert judge.degeneracy_penalty("Great place, lovely staff and fair prices.") == 0.0
    assert judge.degeneracy_penalty("great great") == 1.0  # fewer than 3 words
    # 5 words, 4 bigrams of which 1 distinct: repeated = 0.75 -> 2 * (0.75 - 0.1) = 1.3, capped at 1
    assert judge.degeneracy_penalty("good good good good good") == 1.0
    # 4 words "a b a b": bigrams ab, ba, ab -> repeated 1/3 -> 2 * (1/3 - 0.1) = 0.4667
    assert judge.degeneracy_penalty("nice day nice day") == pytest.approx(2 * (1 / 3 - 0.1))


def test_two_responses_rank_exactly_as_the_pairwise_annotator_labels():
    for seed in range(50):
        golds = [random.Random(seed).uniform(-1, 1), random.Random(seed + 100).uniform(-1, 1)]
        label = judge.annotate(golds[0], golds[1], 8.0, random.Random(seed))
        order = judge.rank(golds, 8.0, random.Random(seed))
        assert order == ([0, 1] if label == 0 else [1, 0])


def test_plackett_luce_ranking_by_hand():
    # beta = 1, golds ln1, ln2, ln4: weights 1 : 2 : 4, i.e. first place 1/7, 2/7, 4/7 -> cumulative 1/7, 3/7, 1
    golds = [0.0, math.log(2), math.log(4)]
    # u = 0.1 < 1/7: response 0 first; then 1 vs 2 is Bradley-Terry: P(1 over 2) = 2/6, u = 0.5 >= 1/3 -> 2
    assert judge.rank(golds, 1.0, Draws(0.1, 0.5)) == [0, 2, 1]
    # u = 0.3 in [1/7, 3/7): response 1 first; P(0 over 2) = 1/5, u = 0.1 < 0.2 -> 0
    assert judge.rank(golds, 1.0, Draws(0.3, 0.1)) == [1, 0, 2]
    assert judge.rank(golds, 1.0, Draws(0.9, 0.9)) == [2, 1, 0]


def test_first_places_follow_the_softmax_of_beta_times_gold():
    golds, beta, n = [0.2, -0.1, 0.5, 0.0], 4.0, 20000
    rng = random.Random(0)
    first = Counter(judge.rank(golds, beta, rng)[0] for _ in range(n))
    z = sum(math.exp(beta * g) for g in golds)
    for i, g in enumerate(golds):
        assert first[i] / n == pytest.approx(math.exp(beta * g) / z, abs=0.012)


def test_a_very_rational_annotator_ranks_by_gold():
    golds = [0.1, 0.9, -0.5, 0.4]
    assert judge.rank(golds, 1e4, random.Random(0)) == [1, 3, 0, 2]


def test_every_pair_of_a_ranking():
    # ranking best first: 2, 0, 1
    assert judge.ranking_pairs([2, 0, 1]) == [(0, 1, 0), (0, 2, 1), (1, 2, 1)]
    assert len(judge.ranking_pairs([3, 1, 0, 2])) == 6
