"""A process whose threads cannot run says so, with where each thread was."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from checkpoint_engine.stall_watch import StallWatch

CHILD = textwrap.dedent(
    """
    import ctypes, logging, threading, time
    from checkpoint_engine.stall_watch import StallWatch

    def hog():  # a foreign call through PyDLL keeps the GIL: no other thread runs for HOG s
        ctypes.PyDLL(None).usleep(int(HOG * 1e6))
        time.sleep(0.3)  # still in hog when the watch runs again

    logging.basicConfig(level=logging.INFO)
    with StallWatch(after=AFTER, period=0.1) as watch:
        time.sleep(0.3)
        threading.Thread(target=hog, name="hog").start()
        time.sleep(0.5)
    print("stalls", len(watch.stalls))
    """
)


def _run(hog: float, after: float) -> tuple[str, str]:
    child = CHILD.replace("HOG", str(hog)).replace("AFTER", str(after))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout, done.stderr


def test_a_thread_holding_the_gil_is_reported_with_every_threads_stack() -> None:
    out, err = _run(1.5, after=0.5)
    assert int(out.split()[1]) >= 1, out
    assert "no Python code of this process ran for" in err
    assert "Thread hog:\n" in err
    assert ", in hog\n" in err


def test_a_process_that_runs_reports_nothing() -> None:
    out, err = _run(0.0, after=2.0)  # a margin for a busy machine's scheduling
    assert out.split()[1] == "0"
    assert "Thread " not in err
    assert "no Python code" not in err


def test_the_period_must_be_shorter_than_the_stall() -> None:
    with pytest.raises(ValueError, match=r"period=2\.0 after=1\.0"):
        StallWatch(after=1.0, period=2.0)
