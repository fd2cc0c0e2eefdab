"""Gradients across the trainer's ranks: each rank's become the whole batch's, and their global norm.

Three kinds of parameter, by name (`named`: the model's `named_parameters()` and the value head's):
- replicated over TP (norms): Qwen3's q/k norms also need their TP ranks' parts summed;
- sharded over TP: each TP rank's slice counts once in the norm;
- MoE experts (`.local_experts.<e>.`): each expert-parallel rank holds its own experts, whose
  gradients already carry every EP rank's tokens (the dispatcher's backward brings them back); they
  are summed over the expert-data-parallel group only, and their norm over the EP group.
Dense gradients are summed over the data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from sidecars.megatron import compat
from sidecars.megatron.convert import expert_index

Named = Sequence[tuple[str, torch.nn.Parameter]]


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def reduce_gradients(named: Named, average: bool) -> None:
    """Every rank's gradients become the whole batch's: first the per-head q/k norms' over the TP
    ranks, then all of them over the DP ranks (`average`: then divided by the DP size, for per-rank
    mean losses; RL micro-batch losses are already weighted by their share of the whole batch)."""
    _sum_qk_norms_over_tensor_parallel(named)
    _reduce_data_parallel(named, average)


def _sum_qk_norms_over_tensor_parallel(named: Named) -> None:
    """Sum the q/k norms' gradients over the TP ranks (what megatron-core's `finalize_model_grads`
    does for `qk_layernorm`): their weight is replicated, but each TP rank normalises its own heads
    with it and holds only those heads' part of the gradient. Left alone, the copies drift apart
    and the exported weights (TP rank 0's) are not those every rank trains with."""
    ps = _ps()
    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    for name, p in named:
        if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def _reduce_data_parallel(named: Named, average: bool) -> None:
    ps = _ps()
    size = ps.get_data_parallel_world_size()
    if size == 1:
        return
    expert_size = ps.get_expert_data_parallel_world_size()
    for name, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if expert_index(name) is None:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        elif expert_size > 1:
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
        if average:
            # An expert's gradient holds every DP rank's share (its EP ranks' through the
            # dispatcher, the rest through the all-reduce): the same divisor as a dense one.
            p.grad.div_(size)


def clip_gradients(named: Named, max_norm: float) -> float:
    """Clip the global gradient norm (`max_norm` <= 0: measure only) and return it. TP-sharded
    parameters count on every TP rank, replicated ones on TP rank 0 only, and experts on every EP
    rank, so the all-reduced sums count each element once."""
    ps = _ps()
    first_tp_rank = ps.get_tensor_model_parallel_rank() == 0
    dense = torch.zeros((), dtype=torch.float64, device=compat.device())
    experts = torch.zeros((), dtype=torch.float64, device=compat.device())
    for name, p in named:
        if p.grad is None:
            continue
        if expert_index(name) is not None:
            experts += p.grad.double().pow(2).sum()
        elif getattr(p, "tensor_model_parallel", False) or first_tp_rank:
            dense += p.grad.double().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(dense, group=ps.get_tensor_model_parallel_group())
    if ps.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(experts, group=ps.get_expert_model_parallel_group())
    norm = float((dense + experts).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
