"""vLLM lifecycle on one node: spawn the sidecar with dummy weights, wait until healthy, kill it.

Terminate means the whole process tree is gone, confirmed: vLLM spawns an engine-core process
and worker processes, so the sidecar runs in its own session (process group); SIGTERM goes to
the group, then SIGKILL after `grace` seconds, and every pid seen in the tree must have exited.
vLLM's message queues live in /dev/shm segments that a killed tree never unlinks; the segments
the tree has mapped are recorded once it is healthy and removed after it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from checkpoint_engine.contracts.vllm_client import VllmClient

log = logging.getLogger(__name__)


class VllmStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class VllmLaunch:
    model_dir: str
    port: int
    log_path: str
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.15
    max_model_len: int = 512
    seed: int = 0
    host: str = "127.0.0.1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sidecars.vllm.server", "--model", self.model_dir, "--host", self.host,
            "--port", str(self.port), "--tensor-parallel", str(self.tensor_parallel),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--max-model-len", str(self.max_model_len), "--seed", str(self.seed),
        ]  # fmt: skip


@dataclass(frozen=True)
class Termination:
    pids: tuple[int, ...]
    rss_freed_bytes: int
    seconds: float
    killed: bool  # True when SIGTERM was not enough


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class VllmProcess:
    def __init__(self, launch: VllmLaunch) -> None:
        self.launch = launch
        self._proc: subprocess.Popen[bytes] | None = None
        self._segments: set[str] = set()
        self._known: list[psutil.Process] = []  # the tree as seen when healthy: outlives a killed root
        self._cancelled = threading.Event()
        self.client = VllmClient(f"http://{launch.host}:{launch.port}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 300.0) -> float:
        """Spawn and wait for /health; returns the start-up seconds. Raises with the log tail on failure."""
        if self.alive():
            raise VllmStartError(f"vLLM (pid {self.pid}) is already running")
        if self._cancelled.is_set():
            raise VllmStartError("vLLM start cancelled: the engine is stopping")
        start = time.perf_counter()
        Path(self.launch.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.launch.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                self.launch.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        deadline = start + timeout
        while time.perf_counter() < deadline:
            if self._cancelled.is_set():
                self.terminate()
                raise VllmStartError("vLLM start cancelled: the engine is stopping")
            if not self.alive():
                code = self._proc.returncode
                raise VllmStartError(
                    f"vLLM exited with code {code} during start-up; last lines of {self.launch.log_path}:\n"
                    + _tail(self.launch.log_path)
                )
            # Recorded while starting too: a start cancelled half-way must not leak them either.
            self._known = self.tree()
            self._segments |= self._mapped_segments()
            try:
                self.client.health()
                self._known = self.tree()
                self._segments |= self._mapped_segments()
                seconds = time.perf_counter() - start
                log.info("vLLM pid %d healthy on port %d after %.1f s", self.pid, self.launch.port, seconds)
                return seconds
            except OSError:
                time.sleep(0.5)
        self.terminate()
        raise VllmStartError(f"vLLM did not become healthy within {timeout:g} s; log: {self.launch.log_path}")

    def cancel(self) -> None:
        """Make a start in progress (in another thread) kill what it spawned and give up; no more starts."""
        self._cancelled.set()

    def tree(self) -> list[psutil.Process]:
        if not self.alive():
            return []
        root = psutil.Process(self._proc.pid)
        return [root, *root.children(recursive=True)]

    def _mapped_segments(self) -> set[str]:
        found = set()
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                found |= {m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/")}
        return found

    def terminate(self, grace: float = 10.0) -> Termination:
        """SIGTERM the process group, SIGKILL it after `grace` s; returns once every pid is gone."""
        start = time.perf_counter()
        self._segments |= self._mapped_segments()
        procs = list({p.pid: p for p in [*self._known, *self.tree()] if p.is_running()}.values())
        rss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        killed = False
        if self._proc is not None:
            # The session leader's pid is the group id (start_new_session); the group outlives a
            # killed leader, so it is signalled even when the leader is already gone.
            pgid = self._proc.pid
            _signal_group(pgid, signal.SIGTERM)
            _, still = psutil.wait_procs(procs, timeout=grace)
            if still:
                killed = True
                _signal_group(pgid, signal.SIGKILL)
                for p in still:
                    _kill(p)
                _, still = psutil.wait_procs(still, timeout=10)
                if still:
                    raise RuntimeError(f"vLLM processes {[p.pid for p in still]} survived SIGKILL")
            self._proc.wait()
        self._proc = None
        self._known = []
        for path in self._segments:
            Path(path).unlink(missing_ok=True)
        self._segments = set()
        return Termination(tuple(p.pid for p in procs), rss, time.perf_counter() - start, killed)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _kill(p: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.kill()
