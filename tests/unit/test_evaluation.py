"""pass@k against brute-force enumeration, cons@N votes with ties, and percentiles against numpy."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from engine.evaluation import (
    cons_at_n,
    majority_vote,
    mean_cons_at_n,
    mean_pass_at_k,
    pass_at_k,
    percentile,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(n, c, k) for n in (1, 2, 5, 8) for c in range(n + 1) for k in range(1, n + 1)] + [(10, 3, 4), (12, 1, 6)],
)
def test_pass_at_k_equals_enumeration(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_success_rate() -> None:
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)


def test_pass_at_k_large_n_is_stable() -> None:
    n, c, k = 1000, 3, 100  # C(1000, 100) overflows a float
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)


def test_pass_at_k_k_above_n_names_both() -> None:
    with pytest.raises(ValueError, match=r"k=5.*n=4"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize(("n", "c", "k", "match"), [(4, 5, 1, "c=5"), (4, -1, 1, "c=-1"), (4, 1, 0, "k=0")])
def test_pass_at_k_rejects_bad_counts(n: int, c: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_over_prompts() -> None:
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    expected = (pass_at_k(4, 1, 2) + 0.0 + 1.0) / 3
    assert mean_pass_at_k(correct, 2) == pytest.approx(expected)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        mean_pass_at_k([], 1)


@pytest.mark.parametrize(
    ("answers", "vote"),
    [
        (["3", "4", "4", "3", "4"], "4"),  # clear majority
        (["3", "4", "4", "3"], "3"),  # tie 2-2: the one seen first wins
        (["4", "3", "3", "4"], "4"),  # the same tie in the other order
        (["1", "2", "3"], "1"),  # all distinct: the first
        ([None, None, "7", None], "7"),  # unextracted answers cast no vote
        (["5", None, None, None, "6", "6"], "6"),  # None does not pool its votes
        ([None, None], None),
    ],
)
def test_majority_vote(answers: list[str | None], vote: str | None) -> None:
    assert majority_vote(answers) == vote


def test_cons_at_n_uses_the_correctness_function() -> None:
    def same_number(answer: str, reference: str) -> bool:
        return float(answer) == float(reference)

    assert cons_at_n(["2.0", "3", "2.0"], "2", same_number)
    assert not cons_at_n(["3", "2.0", "3"], "2", same_number)
    assert not cons_at_n(["2", "3"], "3", same_number)  # tie broken towards the first ("2"): wrong
    assert not cons_at_n([None, None], "3", same_number)
    answers = [["1", "1", "2"], ["5", "6", "6"], [None, "9", None]]
    assert mean_cons_at_n(answers, ["1", "5", "9"], same_number) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 references"):
        mean_cons_at_n(answers, ["1", "5"], same_number)


def test_percentile_matches_numpy() -> None:
    values = sorted([3.0, -1.0, 7.5, 2.0, 2.0, 10.0, 0.25])
    for p in (0, 25, 50, 90, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
