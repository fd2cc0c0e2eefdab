"""A child process in its own session, and a stop that leaves nothing of its tree running.

Consumes: an argv, a log file path, and optionally extra environment variables and a working directory.
Produces: `ProcessGroup`, the running child (pid, poll, wait, its process tree) and, from `stop`, a `Stopped`
report: every pid that was running, the resident memory they held, how long the stop took and whether
SIGTERM had to be followed by SIGKILL.
Waits on: in `stop`, every known process of the tree to exit, `grace` seconds after SIGTERM and up to
`KILL_WAIT` seconds after SIGKILL (it raises if any survives that), then up to `REAP_WAIT` seconds for
init to reap the exited orphans. A zombie counts as exited: it holds no memory and no devices.

The child is a session leader, so its pid is the id of a process group that holds the whole tree (unless a
descendant starts a session of its own): one signal reaches all of it, and Ctrl-C in the launcher's terminal
reaches none of it. A killed root's children are re-parented and no longer show as its descendants, so the
tree can be recorded with `remember_tree` while the root lives; `stop` waits for those pids too.

`adopt` takes a session leader another process forked (the vLLM zygote's sidecars): it is watched through
psutil instead of `Popen`, its parent reaps it, and its exit status is not known here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil

from checkpoint_engine.contracts.lifetime import die_with_parent, running
from checkpoint_engine.contracts.polling import poll_until

KILL_WAIT = 10.0  # seconds a SIGKILLed process may take to exit (it may be in uninterruptible I/O)
# Seconds to let init reap exited orphans, so that their pids are gone too when stop returns; some
# inits poll (about 1.5 s seen), and a container's pid 1 may never reap, which is not worth failing for.
REAP_WAIT = 5.0
_POLL = 0.02


@dataclass(frozen=True)
class Stopped:
    pids: tuple[int, ...]  # every process of the tree that was running when the stop began
    rss_freed_bytes: int
    seconds: float
    killed: bool  # True when SIGTERM was not enough


class ProcessGroup:
    """One spawned child and the processes it starts: `g = ProcessGroup.spawn(argv, log); ...; g.stop(10)`."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self._pid = pid
        self._popen = popen
        self._remembered: dict[int, psutil.Process] = {}
        self._root: psutil.Process | None = None
        if popen is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._root = psutil.Process(pid)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        *,
        parent_death: signal.Signals | None = None,
    ) -> ProcessGroup:
        """Start `argv` in a new session, stdout and stderr appended to `log_path`.

        `env` is added to (not substituted for) this process's environment. `parent_death`: the signal the
        child gets when this process exits, however it exits; the kernel sends it when the spawning thread
        ends, so a thread other than the main one spawns only what must not outlive it. Such a thread arms
        the signal through `setpriv` rather than Python code between fork and exec, which can hang a process
        whose other threads hold locks (seen with gRPC's).
        """
        arm = None
        if parent_death is not None and threading.current_thread() is threading.main_thread():
            arm = partial(die_with_parent, parent_death, os.getpid())
        elif parent_death is not None:
            argv = ["setpriv", f"--pdeathsig={parent_death.name}", "--", *argv]
        # Append, so that an earlier run's log on the same path survives; the child keeps its own descriptor.
        with Path(log_path).open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                preexec_fn=arm,  # noqa: PLW1509 - takes no lock: a prctl and a getppid
            )
        return cls(popen.pid, popen)

    @classmethod
    def adopt(cls, pid: int) -> ProcessGroup:
        """The group of a session leader this process did not spawn (and does not reap)."""
        return cls(pid)

    @property
    def pid(self) -> int:
        """The root's pid, which is also the process group's and the session's id."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """The root's exit status once `poll`, `wait` or `stop` saw it exit (negative: killed by that signal);
        always None for an adopted root."""
        return self._popen.returncode if self._popen else None

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the root only; raises `subprocess.TimeoutExpired`. Its descendants may live on."""
        if self._popen is None:
            raise TypeError("an adopted process group cannot be waited for; use stop")
        return self._popen.wait(timeout)

    def alive(self) -> bool:
        if self._popen is None:
            return self._root is not None and running(self._root)
        return self._popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The root and its descendants now; empty once the root has exited."""
        if not self.alive():
            return []
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:  # the root exited between the poll and the scan
            return []

    def remember_tree(self) -> list[psutil.Process]:
        """Record the current tree, so that `stop` still finds those processes after the root has died."""
        tree = self.tree()
        self._remembered.update((p.pid, p) for p in tree)
        return tree

    def known(self) -> list[psutil.Process]:
        """The current tree and every remembered process still running (psutil checks a pid was not reused)."""
        found = {p.pid: p for p in [*self._remembered.values(), *self.tree()]}
        return [p for p in found.values() if running(p)]

    def stop(self, grace: float) -> Stopped:
        """SIGTERM the group, SIGKILL it after `grace` s; returns once every known process is gone. Idempotent."""
        start = time.perf_counter()
        # The group id is the root's pid. While the root is unreaped or a member still runs, no other
        # process can hold that id, so the signal cannot reach a stranger; the group outlives a killed root.
        unreaped = self.alive() if self._popen is None else self._popen.returncode is None
        procs = self.known()
        signal_group = unreaped or bool(procs)
        rss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        if signal_group:
            _signal_group(self.pid, signal.SIGTERM)
        still = self._wait(procs, grace)
        if still:
            if signal_group:
                _signal_group(self.pid, signal.SIGKILL)
            for p in still:  # a member that left the group is not reached by the group signal
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            survivors = self._wait(still, KILL_WAIT)
            if survivors:
                raise RuntimeError(f"processes {[p.pid for p in survivors]} of group {self.pid} survived SIGKILL")
        if self._popen is not None:
            self._popen.wait()
        _await_reaped(procs, REAP_WAIT)
        self._remembered.clear()
        return Stopped(tuple(p.pid for p in procs), rss, time.perf_counter() - start, killed=bool(still))

    def _wait(self, procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        """Those of `procs` still running after up to `timeout` s."""

        def running_ones() -> list[psutil.Process]:
            # The root is polled through Popen, which reaps it and keeps its exit status.
            return [p for p in procs if (self.alive() if p.pid == self.pid else running(p))]

        if poll_until(lambda: None if running_ones() else True, timeout, every=_POLL):
            return []
        return running_ones()


# A line a Python traceback ends with: `pkg.mod.SomeError: message` (or SystemExit's text).
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b:?")
_LOG_TAIL_BYTES = 64 << 10
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")  # torchrun's mark on each line a rank writes to stderr
# torchrun's last words when a rank failed, after the rank's own error, which is the cause.
_TORCHRUN_SUMMARY = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


def last_error(log_path: str | os.PathLike[str]) -> str:
    """The last error a process's log names (the final line of its last traceback), else its last line:
    the cause of an exit in one line, for a message that points to the log for the rest."""
    try:
        with Path(log_path).open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES, 0))
            text = f.read().decode(errors="replace")
        lines = [_RANK_PREFIX.sub("", ln).strip() for ln in text.splitlines() if ln.strip()]
    except OSError as e:
        return f"no log: {e}"
    if not lines:
        return f"{log_path} is empty"
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and not ln.startswith(_TORCHRUN_SUMMARY)]
    return (errors or lines)[-1][:300]


def _await_reaped(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until the exited `procs` are reaped (their pids gone), up to `timeout` s; they are dead either way."""
    poll_until(lambda: None if any(p.is_running() for p in procs) else True, timeout, every=_POLL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
