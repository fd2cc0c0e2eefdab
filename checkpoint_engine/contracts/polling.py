"""The one way the project waits for something it cannot be told about: ask again until a deadline.

`poll_until` asks; a caller whose question itself blocks (a long poll, a barrier slice) sizes each
ask with `Deadline.left`. The caller raises its own error, naming what it waited for, on None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """`timeout` seconds from now, on the monotonic clock."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at = clock() + timeout

    def left(self, at_most: float = float("inf"), at_least: float = 0.0) -> float:
        """The seconds left, clamped to [at_least, at_most]."""
        return min(at_most, max(self.at - self.clock(), at_least))

    def passed(self) -> bool:
        return self.clock() >= self.at


def poll_until(
    check: Callable[[], T | None],
    timeout: float,
    *,
    every: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """The first result of `check()` that is not None, asking every `every` s (`check` may block for
    a while itself); None once `timeout` s passed. `check` runs at least once, and once more at the end."""
    deadline = Deadline(timeout, clock)
    while True:
        found = check()
        if found is not None or deadline.passed():
            return found
        sleep(deadline.left(at_most=every))
