"""Fault injection against a real run: find its processes, wait for one of its phases, kill what the fault names.

Everything is found from the run directory (the engine's port in `engine-<node>.json`, the vLLM sidecar's
pid beside the zygote's request file), so a fault lands in the run under test and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_protocol import ZygoteFiles
from engine.batch import load_batch
from engine.sampling import UniformSampler
from engine.tasks import make_task

SHM = Path("/dev/shm")


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
    pid_file = ZygoteFiles(Path(args[args.index("--zygote") + 1])).sidecar_pid
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


def wait_for_phase(under: Path, iteration: int, phase: str, timeout: float = 600.0, *, since: float = 0.0) -> Path:
    """Block until the run under `under` is at `phase` of `iteration` (its engine's /status, polled every
    20 ms), asking only an engine started after `since` (a time.time()); returns the run directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in under.glob("*/engine-node0.json"):
            with contextlib.suppress(OSError, ValueError, requests.RequestException):
                if doc.stat().st_mtime <= since:
                    continue
                where = json.loads(doc.read_text())  # off loopback, the engine asks for its token
                auth = {"Authorization": f"Bearer {where['token']}"} if where.get("token") else {}
                url = f"http://{where['host']}:{where['port']}/status"
                state = requests.get(url, headers=auth, timeout=1).json()["phase"] or {}
                if (state.get("iteration"), state.get("phase")) == (iteration, phase):
                    return doc.parent
        time.sleep(0.02)
    raise AssertionError(f"no run under {under} reached {phase} of iteration {iteration} within {timeout:g} s")


def kill_process(run_dir: Path, *args: str, sig: int = signal.SIGKILL, unless: str | None = None) -> int:
    """Send `sig` to the run's first process whose command line holds each of `args` and names the run (and
    does not hold `unless`); its pid."""
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if all(a in line for a in (*args, str(run_dir))) and not (unless and unless in line):
            os.kill(p.pid, sig)
            return p.pid
    raise AssertionError(f"no process of {run_dir} runs {' '.join(args)}")


def kill_trainer_rank(run_dir: Path, node: str = "node0") -> int:
    """SIGKILL a trainer rank of the run's `node` (not torchrun, whose command line names the module too)."""
    return kill_process(run_dir, "sidecars.megatron.rank_main", f"trainer-{node}.json", unless="torch.distributed.run")


def kill_vllm(run_dir: Path, node: str = "node0") -> int:
    """SIGKILL the serving vLLM sidecar of the run's `node`; its pid."""
    pid = int((run_dir / "logs" / f"vllm-{node}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    return pid


def leftovers(run_dir: Path, shm_before: set[Path], timeout: float = 30.0) -> list[str]:
    """Processes whose command line names the run directory and /dev/shm entries that were not there
    before the run, once `timeout` s have not made them go (a killed job's children stop in a few)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            f"pid {p.pid}: {' '.join(p.info['cmdline'][:6])}"
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and str(run_dir) in " ".join(p.info["cmdline"])
        ]
        found += [str(p) for p in set(SHM.iterdir()) - shm_before]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


@dataclass(frozen=True)
class PromptCount:
    lost: int
    repeated: int


def prompts_against_uninterrupted(paths: RunPaths, iterations: int, pool: int, prompts: int, seed: int) -> PromptCount:
    """The prompts each iteration's batch trained on against the sequence an uninterrupted run samples."""
    task = make_task("addition", max_digits=2)
    sampler = UniformSampler(task.samples("train", pool, seed), seed)
    expected = [s.uid for _ in range(iterations) for s in sampler.sample(prompts)]
    trained = [uid for i in range(iterations) for uid in dict.fromkeys(load_batch(paths.batch(i)).prompt_uids)]
    missing, extra = Counter(expected) - Counter(trained), Counter(trained) - Counter(expected)
    return PromptCount(lost=sum(missing.values()), repeated=sum(extra.values()))
