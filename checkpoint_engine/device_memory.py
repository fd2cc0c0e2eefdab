"""Accelerator memory as the driver sees it (NVML): per GPU, what is in use and which process holds it.

torch's allocator counts only its own tensors; NVML also sees CUDA contexts, NCCL's buffers and other
processes, which is what decides whether vLLM's KV cache fits next to an offloaded trainer. The engine
reads every GPU before START_VLLM and after TERMINATE_VLLM (`released`): a vLLM tree that leaves more than
`phase.device_margin_gib` in use fails the phase, naming the process that holds it. Without NVML (no
NVIDIA driver: a CPU machine) every reading is None and nothing is checked.

NVML names processes by their pid in the host's pid namespace; inside a container without the host's pid
namespace those pids are not the container's, so a culprit is named by pid and bytes only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger(__name__)

GIB = 1 << 30
RELEASE_TIMEOUT = 10.0  # s the driver gets to free a killed process tree's memory


class DeviceMemoryLeft(RuntimeError):
    """A process tree that was killed left accelerator memory in use beyond the margin."""


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total: int
    used: int
    processes: dict[int, int]  # pid -> bytes it holds on this GPU (compute processes)

    @property
    def free(self) -> int:
        return self.total - self.used


@functools.cache
def _nvml() -> ModuleType | None:
    """pynvml, initialised once per process; None without it or without a driver."""
    try:
        import pynvml  # nvidia-ml-py, in the GPU lock (vLLM's dependency)

        pynvml.nvmlInit()
    except Exception as e:  # ImportError, or NVMLError_LibraryNotFound / DriverNotLoaded on a machine without one
        log.debug("no NVML here: %s", e)
        return None
    return pynvml


def read_gpus(nvml: ModuleType | None = None) -> list[GpuMemory] | None:
    """Every GPU's memory and its compute processes now; None without NVML."""
    nvml = nvml if nvml is not None else _nvml()
    if nvml is None:
        return None
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        held = {p.pid: int(p.usedGpuMemory or 0) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        gpus.append(GpuMemory(index=index, total=int(info.total), used=int(info.used), processes=held))
    return gpus


def left_behind(before: list[GpuMemory], after: list[GpuMemory], margin: int) -> str | None:
    """None when no GPU has more than `margin` bytes more in use after than before; else what is, naming the
    processes whose share grew (or that appeared), largest first."""
    problems = []
    for b, a in zip(before, after, strict=True):
        grown = a.used - b.used
        if grown <= margin:
            continue
        culprits = sorted(
            ((pid, n - b.processes.get(pid, 0)) for pid, n in a.processes.items() if n > b.processes.get(pid, 0)),
            key=lambda c: -c[1],
        )
        who = ", ".join(f"pid {pid} holds {n / GIB:.2f} GiB more" for pid, n in culprits) or "no compute process"
        problems.append(f"GPU {a.index}: {grown / GIB:.2f} GiB more in use ({who})")
    if not problems:
        return None
    return "; ".join(problems) + f" (phase.device_margin_gib={margin / GIB:g})"


def released(
    before: list[GpuMemory] | None,
    margin: int,
    timeout: float,
    read: Callable[[], list[GpuMemory] | None] = read_gpus,
) -> tuple[list[GpuMemory] | None, str | None]:
    """After a kill: the GPUs once every one is back within `margin` of `before` (the driver frees a dead
    process's memory a moment after it exits), or after `timeout` s with what is left behind."""
    deadline = time.monotonic() + timeout
    while True:
        after = read()
        if before is None or after is None:
            return after, None
        problem = left_behind(before, after, margin)
        if problem is None or time.monotonic() >= deadline:
            return after, problem
        time.sleep(0.1)
