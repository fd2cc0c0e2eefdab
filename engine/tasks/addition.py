"""`addition`: prompts `a+b=` with integer operands; reward on the sum, exact or per digit.

The per-digit (`partial`) reward aligns the answer's digits from the right (units with units) so
that a model which already gets the units digit right earns something for it: a denser signal
for a tiny model whose exact-match success rate starts near zero. "Correct" stays exact-match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from checkpoint_engine.contracts.config import ConfigError
from engine.tasks.base import (
    RewardKind,
    Sample,
    Split,
    check_reward_kind,
    distinct_samples,
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
            raise ConfigError(f"{self.name}.max_digits must be in 1..9, got {self.max_digits}")
        check_reward_kind(self.name, self.reward_kind)
        split_of("probe", self.heldout_fraction)  # validates the fraction

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        upper = 10**self.max_digits

        def draw(rng: random.Random) -> Sample:
            a, b = rng.randrange(upper), rng.randrange(upper)
            digits = max(len(str(a)), len(str(b)))
            return Sample(uid=f"add:{a}+{b}", prompt=f"{a}+{b}=", answer=str(a + b), difficulty=float(digits))

        return distinct_samples(
            draw,
            split,
            n,
            seed=f"{self.name}:{seed}",
            heldout_fraction=self.heldout_fraction,
            task=f"addition(max_digits={self.max_digits}, {upper * upper} pairs)",
        )

    def answer(self, response: str) -> str | None:
        return first_line(response) or None

    def reward(self, response: str, sample: Sample) -> float:
        got = self.answer(response)
        if got == sample.answer:
            return 1.0
        if self.reward_kind == "exact" or not got or not got.isdigit():
            return 0.0
        return partial_credit(got[::-1], sample.answer[::-1]) * 0.5  # below any exact answer
