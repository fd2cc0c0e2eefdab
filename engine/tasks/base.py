"""The task interface: seeded prompt generators with disjoint train / held-out splits and a reward.

A task produces `Sample`s (prompt text and reference answer) and scores a response string.
Tasks know nothing of tokenizers or models; `engine` turns samples into token ids elsewhere.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from checkpoint_engine.contracts.config import ConfigError

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

RewardKind = Literal["exact", "partial"]  # partial: credit per matching position (tasks say how they align)
REWARD_KINDS: tuple[RewardKind, ...] = ("exact", "partial")


@dataclass(frozen=True)
class Sample:
    """One prompt with its reference answer; `uid` is stable across runs (used for dedup and resume)."""

    uid: str
    prompt: str
    answer: str
    difficulty: float = 0.0
    # The whole response the cold start teaches (worked steps and answer); the answer alone when empty.
    demonstration: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False)


class Task(Protocol):
    name: str

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        """`n` distinct samples of `split`, the same list for the same seed."""
        ...

    def reward(self, response: str, sample: Sample) -> float:
        """Reward in [0, 1] for `response` to `sample.prompt`."""
        ...

    def answer(self, response: str) -> str | None:
        """The final answer `response` states, as the reward reads it (None: none), for majority votes."""
        ...


def take_task_metrics(task: Task) -> dict[str, float]:
    """The task's own counts since the last call (the code task's outcomes: `reward/code/...`); {} for
    the tasks that keep none."""
    take = getattr(task, "take_metrics", None)
    return take() if take is not None else {}


def distinct_samples(
    draw: Callable[[random.Random], Sample], split: Split, n: int, *, seed: str, heldout_fraction: float, task: str
) -> list[Sample]:
    """`n` distinct samples of `split` by rejection: `draw` makes one from the generator seeded with
    `seed` and the split, and a sample whose prompt is in the other split or already drawn is drawn
    again. The loop bound makes an impossible request fail, naming `task` (with its options), instead
    of spinning."""
    check_split(split)
    check_count(n)
    rng = random.Random(f"{seed}:{split}")
    seen: dict[str, Sample] = {}
    for _ in range(50 * n + 1000):
        if len(seen) == n:
            break
        sample = draw(rng)
        if sample.prompt not in seen and split_of(sample.prompt, heldout_fraction) == split:
            seen[sample.prompt] = sample
    if len(seen) < n:
        raise ConfigError(f"{task} cannot give {n} distinct {split} samples; ask for fewer")
    return list(seen.values())


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def check_reward_kind(task: str, kind: str) -> RewardKind:
    if kind not in REWARD_KINDS:
        raise ConfigError(f"{task}.reward_kind must be one of {REWARD_KINDS}, got {kind!r}")
    return kind


def check_count(n: int) -> int:
    # A negative n would never equal len(seen) in the generators' loops and return whatever they drew.
    if n < 0:
        raise ConfigError(f"number of samples must be >= 0, got {n}")
    return n


def split_of(key: str, heldout_fraction: float) -> Split:
    """Assign `key` to a split by hash, so the splits are disjoint whatever the seed or order."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    digest = hashlib.sha256(key.encode()).digest()
    bucket = int.from_bytes(digest[:8], "little") / 2**64
    return "heldout" if bucket < heldout_fraction else "train"


def first_line(response: str) -> str:
    """The answer part of a completion: text up to the first newline, stripped."""
    return response.split("\n", 1)[0].strip()


def partial_credit(got: str, want: str) -> float:
    """Fraction of `want`'s positions matched by `got`; extra characters count against it."""
    if not want:
        return 1.0 if not got else 0.0
    hits = sum(1 for g, w in zip(got, want, strict=False) if g == w)
    return hits / max(len(want), len(got))
