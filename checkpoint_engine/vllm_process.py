"""vLLM lifecycle on one node: a zygote (imports done), a sidecar forked from it at START_VLLM, healthy
with dummy weights, killed after the rollout.

Start-up on CPU is mostly Python imports, so the engine spawns a zygote once (`prepare`, at engine
start): it imports torch and vLLM while the trainer works and then forks a fresh sidecar for every
START_VLLM (`start`), which pays for vLLM's build alone. With `zygote_dir`, the zygote is not the
engine's: it runs in the node's vLLM container (`timeshare vllm-zygote DIR`, sharing the trainer
container's PID namespace and /dev/shm), and the engine asks it for sidecars through DIR and adopts
them alike. Terminate means the sidecar's whole process
tree is gone, confirmed, at once: the sidecar is a session leader adopted as a `ProcessGroup` (with
vLLM's engine-core and worker processes when TP > 1), the group is SIGKILLed, and every pid seen in
the tree must have exited. The engine's own zygote lives until the engine stops and exits with it;
every sidecar exits with its zygote or with the engine that asked for it.
vLLM's message queues live in /dev/shm segments that a killed tree never unlinks; the segments
the tree has mapped are recorded while it starts and before it is killed, and removed after it is
gone, with any multiprocessing segment made since its fork that no live process maps (a creator
killed before its finalizer ran leaves such a name behind).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from checkpoint_engine.contracts.vllm_client import VllmClient
from checkpoint_engine.contracts.vllm_protocol import (
    ForkRequest,
    StartupTimes,
    VllmSettings,
    ZygoteFiles,
    write_atomically,
)
from checkpoint_engine.contracts.weight_region import SHM_DIR as SHM
from checkpoint_engine.process_group import ProcessGroup, Stopped

log = logging.getLogger(__name__)

# Names multiprocessing gives its named semaphores and shared memory (vLLM's spawned workers use both).
MULTIPROCESSING_SEGMENTS = ("sem.mp-", "psm_")
# How long a start waits for a zygote of its own to be there (its container may be starting or restarting).
EXTERNAL_ZYGOTE_WAIT = 60.0


class VllmStartError(RuntimeError):
    pass


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class VllmProcess:
    def __init__(self, settings: VllmSettings, log_path: Path, zygote_dir: Path | None = None) -> None:
        self.settings, self.log_path = settings, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.external = zygote_dir is not None
        self.files = ZygoteFiles(Path(zygote_dir) / "vllm" if zygote_dir else log_path.with_suffix(""))
        self.files.prefix.parent.mkdir(parents=True, exist_ok=True)
        # Every sidecar reads its settings from this file, once forked.
        write_atomically(self.files.settings, settings.model_dump_json(indent=2))
        self.startup: StartupTimes | None = None  # the last start's breakdown, as the sidecar measured it
        self._zygote: ProcessGroup | None = None
        self._group: ProcessGroup | None = None  # the sidecar forked by the last start
        self._segments: set[str] = set()
        self._shm_at_fork: set[str] = set()  # /dev/shm's names before the last sidecar was forked
        self._cancelled = threading.Event()
        self.client = VllmClient(f"http://{settings.host}:{settings.port}")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "sidecars.vllm.zygote", "--zygote", str(self.files.prefix)]

    @property
    def pid(self) -> int | None:
        return self._group.pid if self._group else None

    def alive(self) -> bool:
        """The sidecar lives (it may still be building vLLM)."""
        return self._group is not None and self._group.alive()

    @property
    def zygote_pid(self) -> int | None:
        if self.external:
            return ZygoteFiles.read_pid(self.files.zygote_pid)
        return self._zygote.pid if self._zygote else None

    def zygote_alive(self) -> bool:
        if not self.external:
            return self._zygote is not None and self._zygote.alive()
        pid = self.zygote_pid
        return pid is not None and ProcessGroup.adopt(pid).alive()

    def prepare(self) -> None:
        """Spawn the zygote, which imports torch and vLLM now, touching no accelerator memory, and forks
        a sidecar on each `start`. Does nothing if it is already up, or is not the engine's to spawn."""
        if self.external or self._cancelled.is_set() or self.zygote_alive():
            return
        if self._zygote is not None:  # it died: what it left goes first
            self._zygote.stop(grace=0.0)
        self.files.request.unlink(missing_ok=True)
        self._zygote = ProcessGroup.spawn(self._command(), self.log_path, env={"PYTHONUNBUFFERED": "1"})

    def _fork(self, deadline: float) -> ProcessGroup:
        """Ask the zygote for a sidecar (waiting for its imports if they are not done) and adopt it."""
        self.prepare()
        self._shm_at_fork = set(os.listdir(SHM)) if SHM.is_dir() else set()
        self.files.ask(ForkRequest(engine_pid=os.getpid(), settings=str(self.files.settings), log=str(self.log_path)))
        absent_since = None  # a zygote of its own may be (re)starting
        while time.perf_counter() < deadline:
            self._check_start()
            if self.zygote_alive():
                absent_since = None
            elif not self.external:
                raise VllmStartError(
                    f"vLLM's zygote exited with code {self._zygote.returncode} before forking; last lines of "
                    f"{self.log_path}:\n" + _tail(self.log_path)
                )
            elif absent_since is None:
                absent_since = time.perf_counter()
            elif time.perf_counter() - absent_since > EXTERNAL_ZYGOTE_WAIT:
                raise VllmStartError(
                    f"no vLLM zygote serves {self.files.prefix.parent} (none alive for {EXTERNAL_ZYGOTE_WAIT:g} s): "
                    f"start `timeshare vllm-zygote {self.files.prefix.parent}` (the vLLM container's command) in this "
                    "node's PID namespace, with its /dev/shm"
                )
            pid = ZygoteFiles.read_pid(self.files.sidecar_pid)
            if pid is not None:
                return ProcessGroup.adopt(pid)
            time.sleep(0.01)
        raise VllmStartError(f"vLLM's zygote did not fork a sidecar in time; log: {self.log_path}")

    def _check_start(self) -> None:
        if self._cancelled.is_set():
            self.terminate()
            raise VllmStartError("vLLM start cancelled: the engine is stopping")

    def start(self, timeout: float = 300.0) -> float:
        """Fork a sidecar from the zygote (spawning the zygote first if there is none) and wait for
        /health; returns the seconds this took. Raises with the log tail on failure."""
        if self.alive():
            raise VllmStartError(f"vLLM (pid {self.pid}) is already running")
        self._check_start()
        start = time.perf_counter()
        deadline = start + timeout
        self._group = self._fork(deadline)
        while time.perf_counter() < deadline:
            self._check_start()
            if not self.alive():
                raise VllmStartError(
                    f"vLLM (pid {self.pid}) exited during start-up; last lines of {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            # Recorded while starting too: a start cancelled half-way must not leak them either.
            self._group.remember_tree()
            self._segments |= self._mapped_segments()
            try:
                self.startup = self.client.health().startup
                self._group.remember_tree()
                self._segments |= self._mapped_segments()
                seconds = time.perf_counter() - start
                log.info("vLLM pid %d healthy on port %d after %.1f s", self.pid, self.settings.port, seconds)
                return seconds
            except OSError:
                time.sleep(0.05)
        self.terminate()
        raise VllmStartError(f"vLLM did not become healthy within {timeout:g} s; log: {self.log_path}")

    def start_retrying(self, timeout: float, attempts: int, pause: float = 1.0) -> tuple[float, int]:
        """`start`, and again after a start that failed (the sidecar died or never became healthy;
        a dead zygote is spawned again), up to `attempts` starts in all, `pause` s, then twice that,
        ... apart; each has `timeout`. Returns the seconds of the start that worked and how many
        failed before it; the last failure propagates, and none is retried once cancelled."""
        for failed in range(attempts):
            try:
                return self.start(timeout), failed
            except VllmStartError as e:
                if self._cancelled.is_set() or failed + 1 == attempts:
                    raise
                log.warning("vLLM start %d of %d failed; starting it again: %s", failed + 1, attempts, e)
                self.terminate()
                time.sleep(pause * 2**failed)
        raise VllmStartError(f"vLLM start attempts must be >= 1, got {attempts}")

    def cancel(self) -> None:
        """Make a start in progress (in another thread) kill what it spawned and give up; no more starts."""
        self._cancelled.set()

    def _mapped_segments(self) -> set[str]:
        """The /dev/shm files mapped by any process of the tree, remembered orphans included."""
        found = set()
        for p in self._group.known() if self._group else []:
            with contextlib.suppress(psutil.Error):
                found |= {m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/")}
        return found

    def terminate(self) -> Stopped:
        """Kill the process tree at once (a retired vLLM holds nothing worth a graceful exit) and remove
        its /dev/shm segments; returns once every pid is gone."""
        start = time.perf_counter()
        if self._group is None:
            return Stopped((), 0, time.perf_counter() - start, killed=False)
        self._segments |= self._mapped_segments()
        stopped = self._group.stop(grace=0.0)
        self._group = None
        for path in self._segments | _unmapped_since(self._shm_at_fork):
            Path(path).unlink(missing_ok=True)
        self._segments = set()
        return replace(stopped, seconds=time.perf_counter() - start)  # the segments' removal included

    def close(self) -> None:
        """Kill the sidecar and the engine's own zygote (one of its own serves the next engine): the engine is
        stopping."""
        self.terminate()
        if self._zygote is not None:
            self._zygote.stop(grace=0.0)
            self._zygote = None
            self.files.zygote_pid.unlink(missing_ok=True)
        self.files.request.unlink(missing_ok=True)
        self.files.sidecar_pid.unlink(missing_ok=True)


def _unmapped_since(before: set[str]) -> set[str]:
    """Multiprocessing's /dev/shm entries made since `before`, over a second old, that no live process maps:
    garbage whoever made them (a live process maps its own within microseconds, so another job's are safe)."""
    if not SHM.is_dir():
        return set()
    new = {
        str(SHM / name)
        for name in set(os.listdir(SHM)) - before
        if name.startswith(MULTIPROCESSING_SEGMENTS) and _age(SHM / name) > 1.0
    }
    if not new:
        return set()
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped |= {line.rsplit(" ", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line}
    stray = new - mapped
    if stray:
        log.info(
            "removing %d multiprocessing segments that vLLM's tree left and no process maps: %s",
            len(stray),
            sorted(stray),
        )
    return stray


def _age(path: Path) -> float:
    """Seconds since `path` was last modified; 0 for one gone meanwhile."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
