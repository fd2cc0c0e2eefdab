"""What expert parallelism asks of every forward pass: the same shape, as often, on every EP rank.

The MoE token dispatcher (all-gather on CPU) gathers every EP rank's tokens into one tensor and
scatters the experts' outputs back, so each forward is a collective: the EP ranks must run the
same number of them, each with the same number of tokens. Data-parallel ranks otherwise differ in
both (their own groups; rows padded or packed to their own width). `pad_to_expert_group` pads a
forward's rows to the group's largest batch and width; `micro_steps` is the number of micro-batches
every rank runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def expert_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def pad_to_expert_group(
    tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tokens`/`positions` [B, W] and `mask` [1 or B, 1, W, W] (True: not allowed) padded to the EP
    group's largest B and W. Padding tokens are 0 at position 0 and attend to themselves only, so
    real tokens see exactly what they saw before; the caller keeps the first [B, W] of the outputs."""
    from megatron.core import parallel_state

    if expert_parallel_size() == 1:
        return tokens, positions, mask
    shape = torch.tensor(tokens.shape, dtype=torch.long)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=parallel_state.get_expert_model_parallel_group())
    rows, width = (int(n) for n in shape)
    if (rows, width) == tuple(tokens.shape):
        return tokens, positions, mask
    b, w = tokens.shape
    padded_tokens = tokens.new_zeros(rows, width)
    padded_tokens[:b, :w] = tokens
    padded_positions = positions.new_zeros(rows, width)
    padded_positions[:b, :w] = positions
    mask_rows = 1 if mask.shape[0] == 1 else rows
    padded_mask = torch.ones(mask_rows, 1, width, width, dtype=torch.bool, device=mask.device)
    padded_mask[:, :, range(width), range(width)] = False
    padded_mask[: mask.shape[0], :, :w, :w] = mask
    return padded_tokens, padded_positions, padded_mask


def micro_steps(n_groups: int, data_parallel: int, groups_per_step: int) -> int:
    """Micro-batches each DP rank runs over `n_groups` dealt round-robin: the busiest rank's count,
    which every rank runs under expert parallelism (a rank out of groups runs an empty one)."""
    busiest = -(-n_groups // data_parallel)
    return max(1, -(-busiest // groups_per_step))
