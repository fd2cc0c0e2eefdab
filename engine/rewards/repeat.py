"""Repeat detection: does a token sequence end in the same n-gram repeated back to back?

Consumes response token ids (called as generation proceeds, so only the tail is inspected: the
cost depends on `max_ngram` and `min_repeats`, not on the sequence length); produces the n-gram
size of the repetition, or None. The rollout stops such a trajectory with finish reason "repeat";
`RewardConfig.repeat_penalty` is then subtracted from its reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def tail_repeat(ids: Sequence[int], max_ngram: int, min_repeats: int) -> int | None:
    """The smallest n in 1..max_ngram such that the last n*min_repeats tokens are one n-gram
    repeated `min_repeats` times back to back; None when there is none."""
    if max_ngram < 1 or min_repeats < 2:
        raise ValueError(f"need max_ngram >= 1 and min_repeats >= 2, got {max_ngram} and {min_repeats}")
    length = len(ids)
    for n in range(1, max_ngram + 1):
        span = n * min_repeats
        if span > length:
            break  # larger n need an even longer tail
        # Periodic with period n over the span <=> every token equals the one n places before it.
        if all(ids[i] == ids[i - n] for i in range(length - span + n, length)):
            return n
    return None


@dataclass(frozen=True)
class RepeatDetectionConfig:
    """Stop a trajectory whose tail is an n-gram (n <= max_ngram) repeated min_repeats times."""

    enabled: bool = False
    max_ngram: int = 20
    min_repeats: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"rollout.repeat.enabled must be true or false, got {self.enabled!r}")
        for name, low in (("max_ngram", 1), ("min_repeats", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"rollout.repeat.{name} must be an integer >= {low}, got {value!r}")

    def detect(self, ids: Sequence[int]) -> int | None:
        """The repeated n-gram size when enabled and the tail repeats, else None."""
        if not self.enabled:
            return None
        return tail_repeat(ids, self.max_ngram, self.min_repeats)
