"""Sequence packing: several trajectories per row, each attending only to itself.

A padded batch spends compute on padding: every row is as long as the longest trajectory. Packing
puts trajectories end to end into as few rows of that width as fit (first fit, longest first), with
positions restarting at each one and a block-diagonal causal mask, and scatters the per-token
results back to the padded layout the losses read. Under rotary embeddings attention depends on
relative positions only, so a trajectory's logprobs do not depend on where in a row it sits: packed
and padded forwards agree to float precision. (Megatron's own packed path, THD with cu_seqlens,
needs Transformer Engine; this one works on any attention that takes a mask.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    tokens: torch.Tensor  # [R, W] trajectories end to end, then padding
    positions: torch.Tensor  # [R, W] restarting at 0 for each trajectory
    mask: torch.Tensor  # [R, 1, W, W] True where attention is NOT allowed (Megatron's convention)
    places: tuple[tuple[int, int, int], ...]  # per trajectory of the batch: (row, offset, length)


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of trajectory indices, longest first into the first row with room; each row sums to <= width."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > width:
            raise ValueError(f"trajectory {i} has {lengths[i]} tokens, more than the row width {width}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack(input_ids: torch.Tensor, lengths: list[int], pad_id: int = 0) -> Packed:
    """Pack the first `lengths[i]` tokens of each row of `input_ids` [B, W] into rows of width W."""
    width = input_ids.shape[1]
    rows = first_fit(lengths, width)
    tokens = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which trajectory; -1: padding
    places: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            tokens[r, offset : offset + n] = input_ids[i, :n]
            positions[r, offset : offset + n] = torch.arange(n)
            segment[r, offset : offset + n] = i
            places[i] = (r, offset, n)
            offset += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # padding attends to padding only
    return Packed(tokens, positions, ~allowed[:, None], tuple(places))


def unpack_targets(values: torch.Tensor, packed: Packed, width: int) -> torch.Tensor:
    """Per-target values of the packed rows [R, W-1] back in the padded layout [B, W-1] (0 past each end)."""
    rows = []
    for r, offset, n in packed.places:
        row = values[r, offset : offset + n - 1]  # targets 1..n-1 of the trajectory
        rows.append(torch.cat([row, values.new_zeros(width - n)]) if n < width else row)
    return torch.stack(rows)


def sequence_lengths(versions: torch.Tensor) -> list[int]:
    """Prompt + response length of each row, from the batch's per-target versions (-1 off the response)."""
    width = versions.shape[1] + 1
    lengths = []
    for row in versions:
        sampled = (row >= 0).nonzero()
        lengths.append(int(sampled[-1]) + 2 if len(sampled) else width)
    return lengths
