"""A process that dies with its parent: no trainer rank, engine or etcd outlives a launcher killed by SIGKILL.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) is delivered when the thread that forked the
process exits, so it is set only for children that a process's main thread spawns (the launcher's, and
torchrun's ranks). It survives `exec`, so a launcher sets it between fork and exec (`ProcessGroup.spawn`),
and a Python child can also set it on itself first thing (`sidecars.megatron.rank_main`).
`running` is the one test of whether a watched process still lives, for the engine and the sidecars alike.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import psutil

_PR_SET_PDEATHSIG = 1
# Looked up once here, not between fork and exec, where the child must not take the loader's locks.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: signal.Signals = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits; if the parent (pid `parent`,
    default: the current one) is already gone, send it now. A no-op off Linux."""
    if _prctl is None:
        return
    expected = os.getppid() if parent is None else parent
    if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def running(p: psutil.Process) -> bool:
    """Running and not a zombie: a zombie holds no memory and is gone once its parent (or init) reaps it."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
