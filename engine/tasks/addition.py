"""`addition`: prompts `a+b=` with integer operands; reward on the sum, exact or per digit.

The per-digit (`partial`) reward aligns the answer's digits from the right (units with units) so
that a model which already gets the units digit right earns something for it: a denser signal
for a tiny model whose exact-match success rate starts near zero. "Correct" stays exact-match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from engine.tasks.base import (
    RewardKind,
    Sample,
    Split,
    check_count,
    check_reward_kind,
    check_split,
    first_line,
    partial_credit,
    split_of,
)


@dataclass
class AdditionTask:
    """Operands have 1..`max_digits` digits; difficulty is the number of digits of the larger one."""

    max_digits: int = 2
    reward_kind: RewardKind = "exact"
    heldout_fraction: float = 0.1
    name: str = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 9:
            raise ValueError(f"addition.max_digits must be in 1..9, got {self.max_digits}")
        check_reward_kind("addition", self.reward_kind)
        split_of("probe", self.heldout_fraction)  # validates the fraction

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        check_split(split)
        check_count(n)
        upper = 10**self.max_digits
        capacity = upper * upper
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: dict[str, Sample] = {}
        # Rejection sampling: the loop bound makes an impossible request fail instead of spinning.
        for _ in range(50 * n + 1000):
            if len(seen) == n:
                break
            a, b = rng.randrange(upper), rng.randrange(upper)
            key = f"{a}+{b}"
            if key in seen or split_of(key, self.heldout_fraction) != split:
                continue
            digits = max(len(str(a)), len(str(b)))
            seen[key] = Sample(uid=f"add:{key}", prompt=f"{key}=", answer=str(a + b), difficulty=float(digits))
        if len(seen) < n:
            raise ValueError(
                f"addition(max_digits={self.max_digits}) cannot give {n} distinct {split} samples "
                f"(about {capacity} pairs in all); ask for fewer or raise max_digits"
            )
        return list(seen.values())

    def answer(self, response: str) -> str | None:
        return first_line(response) or None

    def reward(self, response: str, sample: Sample) -> float:
        got = first_line(response)
        if got == sample.answer:
            return 1.0
        if self.reward_kind == "exact" or not got.isdigit():
            return 0.0
        return partial_credit(got[::-1], sample.answer[::-1]) * 0.5  # below any exact answer
