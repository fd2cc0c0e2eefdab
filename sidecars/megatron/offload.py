"""OFFLOAD / ONLOAD of one trainer rank: parameters and optimizer state leave the accelerator and come back.

Parameters keep their `torch.nn.Parameter` objects (Megatron hangs its TP attributes on them and
the optimizer indexes its state by them); only their storage moves: to a host copy (pinned where
CUDA is present), and the device storage is freed by pointing `.data` at an empty tensor.
Gradients are dropped (every train step starts from zero grads). On CPU the same moves run into
a second host buffer: nothing is freed on an accelerator there, but the copies are real and
timed, which is what the phase timings report.

Why these moves and not torch_memory_saver (slime, verl, SGLang) or a Megatron offload: this trainer's
device memory is plain tensors only (parameters, the torch optimizer's state; no Megatron DDP grad
buffers, as `gradients.py` reduces `.grad` itself and `zero_grad(set_to_none=True)` drops it; no
distributed optimizer; no CUDA graphs), so moving each tensor's storage and emptying the caching
allocator frees all of it but the CUDA context and NCCL's communicators, which stay (making them again
every iteration costs seconds at scale). A virtual-address pause like torch_memory_saver's matters where
addresses must stay fixed (CUDA graphs) or buffers are out of reach as tensors. What stays is reported:
`offload/device_bytes_left`, the driver's count of the rank's GPU after OFFLOAD.
"""

from __future__ import annotations

import os
import time

import psutil
import torch

from checkpoint_engine.contracts.acks import MoveAck
from sidecars.megatron import compat


def _device_allocated() -> int:
    return torch.cuda.memory_allocated() if compat.on_gpu() else 0


def _device_in_use() -> int:
    """The rank's GPU, all of it that is in use (the driver's count, not only torch's tensors)."""
    if not compat.on_gpu():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=compat.on_gpu())
    host.copy_(t, non_blocking=compat.on_gpu())
    return host


class Offloader:
    """Holds one rank's state while it is off the accelerator."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._params: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._state: dict[tuple[torch.nn.Parameter, str], torch.Tensor] = {}

    @property
    def offloaded(self) -> bool:
        return bool(self._params)

    def _tensors(self) -> tuple[list[torch.nn.Parameter], list[tuple[torch.nn.Parameter, str]]]:
        params = list(self.model.parameters())
        state = [(p, k) for p, s in self.optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)]
        return params, state

    def offload(self) -> MoveAck:
        if self.offloaded:
            raise RuntimeError("the trainer state is already offloaded")
        start, moved, before = time.perf_counter(), 0, _device_in_use()
        params, state = self._tensors()
        for p in params:
            p.grad = None
            self._params[p] = _host_copy(p.data)
            moved += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for p, k in state:
            t = self.optimizer.state[p][k]
            self._state[(p, k)] = _host_copy(t)
            moved += t.numel() * t.element_size()
            self.optimizer.state[p][k] = torch.empty(0, dtype=t.dtype, device=t.device)
        if compat.on_gpu():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return self._report(start, moved, before)

    def onload(self) -> MoveAck:
        if not self.offloaded:
            raise RuntimeError("the trainer state is not offloaded")
        start, moved, dev, before = time.perf_counter(), 0, compat.device(), _device_in_use()
        for p, host in self._params.items():
            p.data = host.to(dev, copy=True, non_blocking=compat.on_gpu())
            moved += host.numel() * host.element_size()
        for (p, k), host in self._state.items():
            self.optimizer.state[p][k] = host.to(dev, copy=True, non_blocking=compat.on_gpu())
            moved += host.numel() * host.element_size()
        if compat.on_gpu():
            torch.cuda.synchronize()
        self._params, self._state = {}, {}
        return self._report(start, moved, before)

    def host_parameters(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The host copies of the parameters while offloaded (EXPORT reads them)."""
        return dict(self._params)

    @staticmethod
    def _report(start: float, moved: int, before: int) -> MoveAck:
        return MoveAck(
            device_bytes_in_use_before=before,
            seconds=time.perf_counter() - start,
            bytes_moved=moved,
            device_bytes_after=_device_allocated(),
            device_bytes_in_use=_device_in_use(),
            host_rss_bytes=psutil.Process(os.getpid()).memory_info().rss,
        )
