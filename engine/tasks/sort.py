"""`sort`: prompts `sort:3,1,2=` asking for the digits in ascending order (`123`).

Two rewards: `exact` (1 when the whole answer is right) and `partial` (the fraction of
positions that hold the right digit, a denser signal for a model that starts from nothing).
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
class SortTask:
    min_len: int = 3
    max_len: int = 6
    reward_kind: RewardKind = "exact"
    heldout_fraction: float = 0.1
    name: str = "sort"

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= 32:
            raise ValueError(f"sort needs 1 <= min_len <= max_len <= 32, got {self.min_len}..{self.max_len}")
        check_reward_kind("sort", self.reward_kind)
        split_of("probe", self.heldout_fraction)

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: dict[str, Sample] = {}
        for _ in range(50 * n + 1000):
            if len(seen) == n:
                break
            length = rng.randint(self.min_len, self.max_len)
            digits = [rng.randrange(10) for _ in range(length)]
            key = ",".join(map(str, digits))
            if key in seen or split_of(key, self.heldout_fraction) != split:
                continue
            answer = "".join(map(str, sorted(digits)))
            seen[key] = Sample(uid=f"sort:{key}", prompt=f"sort:{key}=", answer=answer, difficulty=float(length))
        if len(seen) < n:
            raise ValueError(
                f"sort(min_len={self.min_len}, max_len={self.max_len}) cannot give {n} distinct {split} samples; "
                "ask for fewer or raise max_len"
            )
        return list(seen.values())

    def answer(self, response: str) -> str | None:
        return first_line(response) or None

    def reward(self, response: str, sample: Sample) -> float:
        got = first_line(response)
        if self.reward_kind == "exact":
            return 1.0 if got == sample.answer else 0.0
        return partial_credit(got, sample.answer)
