"""vLLM lifecycle on one node: a standby sidecar (imports done), its go, healthy with dummy weights, killed.

Start-up on CPU is mostly Python imports, so the engine spawns the next sidecar as a standby right
after it kills the last one (`prepare`), and START_VLLM only pays for building vLLM (`start`).
Terminate means the whole process tree is gone, confirmed, at once: the sidecar runs as a
`ProcessGroup` (its own session, with vLLM's engine-core and worker processes when TP > 1), the
group is SIGKILLed, and every pid seen in the tree must have exited.
vLLM's message queues live in /dev/shm segments that a killed tree never unlinks; the segments
the tree has mapped are recorded once it is healthy and removed after it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from checkpoint_engine.contracts.vllm_client import VllmClient
from checkpoint_engine.contracts.vllm_protocol import StartupTimes, VllmSettings
from checkpoint_engine.process_group import ProcessGroup, Stopped

log = logging.getLogger(__name__)


class VllmStartError(RuntimeError):
    pass


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class VllmProcess:
    def __init__(self, settings: VllmSettings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        # The sidecar reads its settings from this file (`python -m sidecars.vllm.server <file>`).
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.settings_path = settings.to_json_file(log_path.with_suffix(".json"))
        self._go_path = log_path.with_suffix(".go")  # a standby builds vLLM once this file exists
        self._standby = False  # the running process is a standby waiting for its go
        self.startup: StartupTimes | None = None  # the last start's breakdown, as the sidecar measured it
        self._group: ProcessGroup | None = None
        self._segments: set[str] = set()
        self._cancelled = threading.Event()
        self.client = VllmClient(f"http://{settings.host}:{settings.port}")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "sidecars.vllm.server", str(self.settings_path), "--go", str(self._go_path)]

    @property
    def pid(self) -> int | None:
        return self._group.pid if self._group else None

    def alive(self) -> bool:
        """The sidecar process lives (a standby or a started vLLM)."""
        return self._group is not None and self._group.alive()

    def serving(self) -> bool:
        """vLLM was given its go and the process lives (it may still be building)."""
        return self.alive() and not self._standby

    def standing_by(self) -> bool:
        return self.alive() and self._standby

    def prepare(self) -> None:
        """Spawn a standby sidecar: it imports torch and vLLM now, touching no accelerator memory,
        and builds vLLM on `start`. Does nothing if one is already up."""
        if self._cancelled.is_set() or self.alive():
            return
        self._go_path.unlink(missing_ok=True)
        self._group = ProcessGroup.spawn(self._command(), self.log_path, env={"PYTHONUNBUFFERED": "1"})
        self._standby = True

    def start(self, timeout: float = 300.0) -> float:
        """Give the standby its go (spawning one first if there is none) and wait for /health; returns
        the seconds this took. Raises with the log tail on failure."""
        if self.serving():
            raise VllmStartError(f"vLLM (pid {self.pid}) is already running")
        if self._cancelled.is_set():
            raise VllmStartError("vLLM start cancelled: the engine is stopping")
        start = time.perf_counter()
        self.prepare()
        self._go_path.touch()
        self._standby = False
        deadline = start + timeout
        while time.perf_counter() < deadline:
            if self._cancelled.is_set():
                self.terminate()
                raise VllmStartError("vLLM start cancelled: the engine is stopping")
            if not self.alive():
                code = self._group.returncode
                raise VllmStartError(
                    f"vLLM exited with code {code} during start-up; last lines of {self.log_path}:\n"
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
        self._go_path.unlink(missing_ok=True)
        if self._group is None:
            return Stopped((), 0, time.perf_counter() - start, killed=False)
        self._segments |= self._mapped_segments()
        stopped = self._group.stop(grace=0.0)
        self._group, self._standby = None, False
        for path in self._segments:
            Path(path).unlink(missing_ok=True)
        self._segments = set()
        return replace(stopped, seconds=time.perf_counter() - start)  # the segments' removal included
