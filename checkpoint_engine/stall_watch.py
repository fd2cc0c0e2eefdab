"""A stalled process says so in its log, with where each thread was.

A node whose engine runs no code for a lease's time loses its lease, and the job sees a failed node with
nothing in the log to say why. While a `StallWatch` runs, a thread wakes every `period` s:
- a wake more than `after` s late means no Python code of the process ran for that long (a thread holding
  the GIL, the process stopped or not scheduled), and it logs how long;
- each wake re-arms faulthandler's own thread, which needs no GIL: once `after` s pass without a wake, it
  writes every Python thread's stack to `stream` (the process's log) once, so a stall that lasts shows its
  cause.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
from typing import IO, Self

log = logging.getLogger(__name__)


class StallWatch:
    def __init__(self, after: float, period: float = 1.0, stream: IO[str] | None = None) -> None:
        if not 0 < period < after:
            raise ValueError(f"a stall watch needs 0 < period < after, got period={period} after={after}")
        self.after, self.period, self.stream = after, period, stream or sys.stderr
        self.stalls: list[float] = []  # seconds of each stall seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def __enter__(self) -> Self:
        self._arm()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        faulthandler.cancel_dump_traceback_later()

    def _arm(self) -> None:
        faulthandler.dump_traceback_later(self.after, file=self.stream)  # once per stall: a wake re-arms it

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period):
            now = time.monotonic()
            late = now - last - self.period
            if late > self.after:
                self.stalls.append(late)
                log.warning(
                    "no Python code of this process ran for %.1f s (a thread holding the GIL, or the "
                    "process stopped or not scheduled); thread stacks above, if it lasted",
                    late,
                )
            self._arm()
            last = now
