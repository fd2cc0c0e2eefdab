"""pass@k against brute-force enumeration, cons@N votes with ties, and summary statistics by hand."""

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
    summarize,
    trajectory_stats,
)
from engine.trajectory import Trajectory


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


def test_summarize_matches_numpy() -> None:
    values = [3.0, -1.0, 7.5, 2.0, 2.0, 10.0, 0.25]
    stats = summarize(values, percentiles=(0, 25, 50, 90, 100))
    assert stats.count == 7
    assert stats.mean == pytest.approx(np.mean(values))
    assert stats.std == pytest.approx(np.std(values))
    assert (stats.min, stats.max) == (-1.0, 10.0)
    assert [v for _, v in stats.percentiles] == pytest.approx(np.percentile(values, [0, 25, 50, 90, 100]).tolist())
    d = stats.as_dict("reward/")
    assert d["reward/p50"] == pytest.approx(2.0)
    assert d["reward/p90"] == pytest.approx(np.percentile(values, 90))
    assert d["reward/count"] == 7.0


def test_summarize_single_value_and_errors() -> None:
    stats = summarize([4.0])
    assert (stats.mean, stats.std, stats.min, stats.max) == (4.0, 0.0, 4.0, 4.0)
    assert all(v == 4.0 for _, v in stats.percentiles)
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])
    with pytest.raises(ValueError, match="in \\[0, 100\\]"):
        percentile([1.0], 101)


def test_trajectory_stats() -> None:
    def traj(i: int, n_tokens: int, reward: float | None, reason: str) -> Trajectory:
        return Trajectory(
            "p",
            i,
            [1],
            list(range(n_tokens)),
            [0.0] * n_tokens,
            [0] * n_tokens,
            reason,
            reward,  # type: ignore[arg-type]
        )

    trajs = [traj(0, 4, 1.0, "stop"), traj(1, 8, 0.0, "length"), traj(2, 2, 0.5, "stop"), traj(3, 6, 0.5, "repeat")]
    out = trajectory_stats(trajs)
    assert out["reward/mean"] == pytest.approx(0.5)
    assert out["response_len/max"] == 8.0
    assert out["response_len/mean"] == pytest.approx(5.0)
    assert out["finish/stop"] == pytest.approx(0.5)
    assert out["finish/length"] == pytest.approx(0.25)
    assert out["finish/length_budget"] == 0.0
    with pytest.raises(ValueError, match="no reward"):
        trajectory_stats([traj(0, 1, None, "stop")])
