"""Evaluation metrics: unbiased pass@k, cons@N (majority vote) and percentiles.

Consumes per-prompt correctness flags, extracted answers (already normalised by the task) or plain
numbers; produces floats for the logger. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

A = TypeVar("A", bound=Hashable)
R = TypeVar("R")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the binomials (C(1000, 500)
    overflows a float) and loses no precision when the ratio is tiny.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass@k: {name} must be an int, got {value!r}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n: k={k} is more than the n={n} samples")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c} correct of n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over prompts of pass@k; `correct[p]` holds one flag per sample of prompt p (n may vary)."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    return math.fsum(pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in correct) / len(correct)


def majority_vote(answers: Sequence[A | None]) -> A | None:
    """The most frequent answer; `None` (no answer could be extracted) casts no vote.

    Ties go to the tied answer that appears first in `answers` (the lowest sample index), so the
    result depends only on the answers and their order. None when no sample gave an answer.
    """
    counts: dict[A, int] = {}
    for answer in answers:  # dicts keep first-occurrence order, which breaks the ties below
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    best: A | None = None
    best_count = 0
    for answer, count in counts.items():
        if count > best_count:  # strictly more: an equal count later in the order does not win
            best, best_count = answer, count
    return best


def cons_at_n(answers: Sequence[A | None], reference: R, is_correct: Callable[[A, R], bool]) -> bool:
    """cons@N for one prompt: is the majority answer among its N samples correct? No answer is wrong."""
    if not answers:
        raise ValueError("cons@N needs at least one answer")
    vote = majority_vote(answers)
    return vote is not None and bool(is_correct(vote, reference))


def mean_cons_at_n(
    answers: Sequence[Sequence[A | None]], references: Sequence[R], is_correct: Callable[[A, R], bool]
) -> float:
    """Fraction of prompts whose majority answer is correct; `answers[p]` are prompt p's N answers."""
    if len(answers) != len(references):
        raise ValueError(f"cons@N: {len(answers)} prompts of answers but {len(references)} references")
    if not answers:
        raise ValueError("mean_cons_at_n needs at least one prompt")
    return sum(cons_at_n(a, ref, is_correct) for a, ref in zip(answers, references, strict=True)) / len(answers)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile of ascending `sorted_values`, interpolating linearly between order
    statistics (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    rank = p / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)
