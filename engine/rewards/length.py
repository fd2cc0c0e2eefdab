"""The Kimi k1.5 length reward, computed per group, and its warm-up schedule.

Consumes the token lengths and correctness of one prompt's G responses; produces one value per
response: lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len) (0 when all lengths are equal),
kept as is for a correct response and capped at 0 (min(0, lambda_i)) for a wrong one, so a short
wrong answer is never rewarded. `LengthRewardConfig.scale(iteration)` says how much of it counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from checkpoint_engine.contracts.config import Section


class LengthRewardConfig(Section):
    """Off until `warmup_iterations`; from then on weight * min(1, (it - warmup + 1) / ramp_iterations).

    With ramp_iterations = 0 the full weight applies from `warmup_iterations` on; with ramp = 4 and
    warmup = 10, iterations 10, 11, 12, 13 get 1/4, 2/4, 3/4, 4/4 of the weight.
    """

    KEY = "reward.length"
    enabled: bool = False
    weight: float = Field(1.0, ge=0)
    warmup_iterations: int = Field(0, ge=0)
    ramp_iterations: int = Field(0, ge=0)

    def scale(self, iteration: int) -> float:
        """The weight of the length term at `iteration` (0-based)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if not self.enabled or iteration < self.warmup_iterations:
            return 0.0
        if self.ramp_iterations == 0:
            return float(self.weight)
        progress = min(1.0, (iteration - self.warmup_iterations + 1) / self.ramp_iterations)
        return float(self.weight) * progress


def kimi_length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Per-response length reward of one group (unweighted), in [-0.5, 0.5]."""
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if lo == hi:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct, strict=True)]
