"""Every difference between Megatron on CPU and Megatron on GPU, in one place.

megatron-core 0.16.1 assumes CUDA in a few spots that the forward/backward path touches:
- `torch.cuda.current_device()` is used as the `device=` of new tensors (rotary frequencies,
  TP buffers): on CPU it must answer "cpu".
- `tensor_parallel.random` keeps per-parallel-group RNG states through `torch.cuda` get/set
  calls (the "CUDA RNG tracker", forked around weight init and dropout): on CPU those states
  are the CPU generator's, so forks and seeds keep their meaning.
- The default causal mask is built on "cuda": callers pass an explicit mask (`causal_mask`).
- Megatron's optimizer factory and pipeline schedules hard-code "cuda": on CPU the trainer uses
  a torch optimizer over the model's parameters directly (`make_optimizer`).
- The MoE router's linear reads `te_general_gemm`, which `moe_utils` defines only when Transformer
  Engine imports: without TE (on any device) it must be None (the torch matmul path). The all-to-all token dispatcher
  creates a CUDA stream: on CPU the trainer uses the all-gather dispatcher (`model.build_model`).
On a machine with CUDA nothing here patches anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

# megatron-core warns at import that TE/Apex are absent; on CPU that is the expected set-up.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed.*")

_PATCHED = False


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if on_gpu() else "gloo"


def apply_cpu_shims() -> None:
    """Install the CPU stand-ins; idempotent, and a no-op where CUDA is present (but for the MoE
    router's missing name, which lacks TE's on any device)."""
    global _PATCHED
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if _PATCHED or on_gpu():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    _PATCHED = True


def causal_mask(seq_len: int, dev: torch.device | None = None) -> torch.Tensor:
    """Megatron's mask convention: True where attention is NOT allowed, shape [1, 1, s, s]."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev), diagonal=1)[None, None]


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the given parameters: Megatron's DistributedOptimizer needs CUDA."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
