"""Sequence packing's layout: rows within the width, positions restarting per trajectory, a
block-diagonal causal mask, and values scattered back to the padded layout."""

from __future__ import annotations

import pytest
import torch

from sidecars.megatron.packing import first_fit, pack, sequence_lengths, unpack_targets


def test_first_fit_fills_rows_longest_first_within_the_width() -> None:
    rows = first_fit([5, 3, 8, 2, 6], width=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in row) <= 10 for row in rows)
    assert rows == [[2, 3], [4, 1], [0]]  # 8 and 2; 6 and 3; 5 fits neither of those
    with pytest.raises(ValueError, match="trajectory 0 has 11 tokens, more than the row width 10"):
        first_fit([11], width=10)


def test_pack_lays_trajectories_end_to_end_and_masks_across_them() -> None:
    ids = torch.tensor([[11, 12, 13, 0, 0, 0], [21, 22, 0, 0, 0, 0], [31, 32, 33, 34, 35, 36]])
    packed = pack(ids, [3, 2, 6])
    assert packed.tokens.tolist() == [[31, 32, 33, 34, 35, 36], [11, 12, 13, 21, 22, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert packed.places == ((1, 0, 3), (1, 3, 2), (0, 0, 6))
    allowed = ~packed.mask[1, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False]  # 22 sees 21 and itself only
    assert allowed[2].tolist() == [True, True, True, False, False, False]  # 13 sees its own past
    assert (~packed.mask[0, 0]).tolist() == torch.ones(6, 6, dtype=torch.bool).tril().tolist()


def test_unpack_puts_each_trajectorys_targets_back_in_its_row() -> None:
    ids = torch.tensor([[11, 12, 13, 0], [21, 22, 0, 0]])
    packed = pack(ids, [3, 2])
    per_target = packed.tokens[:, 1:].float()  # the value of each packed target: its own token
    back = unpack_targets(per_target, packed, width=4)
    assert back.tolist() == [[12, 13, 0], [22, 0, 0]]


def test_lengths_come_from_the_last_sampled_target() -> None:
    versions = torch.tensor([[-1, 3, 3, -1, -1], [-1, -1, -1, -1, 2], [-1, -1, -1, -1, -1]])
    assert sequence_lengths(versions) == [4, 6, 6]
