"""A stalled process says so in its log, with where each thread was.

A node whose engine runs no code for a lease's time loses its lease, and the job sees a failed node with
nothing in the log to say why. While a `StallWatch` runs, a thread wakes every `period` s; a wake more than
`after` s late means no Python code of the process ran for that long (a thread holding the GIL, the process
stopped or not scheduled), and it logs how long and every thread's stack as the process runs again.

The stacks are read under the GIL by this thread, not by faulthandler's watchdog: that one dumps without the
GIL, which is safe only while every thread stands still, and an engine continued after a stop (SIGSTOP, a VM
paused) crashed with SIGSEGV when the dump read the frames of threads that were running again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Self

log = logging.getLogger(__name__)


class StallWatch:
    def __init__(self, after: float, period: float = 1.0) -> None:
        if not 0 < period < after:
            raise ValueError(f"a stall watch needs 0 < period < after, got period={period} after={after}")
        self.after, self.period = after, period
        self.stalls: list[float] = []  # seconds of each stall seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period):
            now = time.monotonic()
            late = now - last - self.period
            if late > self.after:
                self.stalls.append(late)
                log.warning(
                    "no Python code of this process ran for %.1f s (a thread holding the GIL, or the "
                    "process stopped or not scheduled); where each thread is now:\n%s",
                    late,
                    thread_stacks(),
                )
            last = now


def thread_stacks() -> str:
    """Every other thread's stack, innermost call last, read under the GIL."""
    names = {t.ident: t.name for t in threading.enumerate()}
    here = threading.get_ident()
    return "".join(
        f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
        if ident != here
    )
