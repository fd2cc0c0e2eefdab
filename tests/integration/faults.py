"""Fault injection for the integration tests: kill a vLLM sidecar in the middle of its start-up."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil


def find_zygote(under: Path, timeout: float = 300.0) -> psutil.Process:
    """The vLLM zygote whose files are under `under` (a test's run directory), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            if "--zygote" in args and str(under) in " ".join(args):
                return p
        time.sleep(0.05)
    raise AssertionError(f"no vLLM zygote under {under} within {timeout:g} s")


def kill_next_sidecar(zygote: psutil.Process, timeout: float = 300.0) -> int:
    """SIGKILL the next sidecar `zygote` forks (the pid it writes beside its request file) as soon as
    it is forked, during its start-up; returns its pid."""
    args = zygote.cmdline()
    pid_file = Path(args[args.index("--zygote") + 1]).with_suffix(".pid")
    stale = pid_file.read_text() if pid_file.exists() else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = pid_file.read_text()
            if text and text != stale:
                os.kill(int(text), signal.SIGKILL)
                return int(text)
        time.sleep(0.005)
    raise AssertionError(f"the zygote (pid {zygote.pid}) forked no sidecar within {timeout:g} s")
