"""`sort`: prompts `sort:3,1,2=` asking for the digits in ascending order (`123`).

Two rewards: `exact` (1 when the whole answer is right) and `partial` (the fraction of
positions that hold the right digit, a denser signal for a model that starts from nothing).
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
class SortTask:
    min_len: int = 3
    max_len: int = 6
    reward_kind: RewardKind = "exact"
    heldout_fraction: float = 0.1
    name: str = "sort"

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= 32:
            raise ConfigError(f"sort needs 1 <= min_len <= max_len <= 32, got {self.min_len}..{self.max_len}")
        check_reward_kind("sort", self.reward_kind)
        split_of("probe", self.heldout_fraction)

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        def draw(rng: random.Random) -> Sample:
            digits = [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]
            key, answer = ",".join(map(str, digits)), "".join(map(str, sorted(digits)))
            return Sample(uid=f"sort:{key}", prompt=f"sort:{key}=", answer=answer, difficulty=float(len(digits)))

        return distinct_samples(
            draw,
            split,
            n,
            seed=f"{self.name}:{seed}",
            heldout_fraction=self.heldout_fraction,
            task=f"sort(min_len={self.min_len}, max_len={self.max_len})",
        )

    def answer(self, response: str) -> str | None:
        return first_line(response) or None

    def reward(self, response: str, sample: Sample) -> float:
        got = first_line(response)
        if self.reward_kind == "exact":
            return 1.0 if got == sample.answer else 0.0
        return partial_credit(got, sample.answer)
