"""Batch building: alignment of targets, masks and logprobs, padding, staleness, advantages."""

from __future__ import annotations

import pytest
import torch

from engine.algorithms import AlgoConfig
from engine.batch import collate, with_advantages
from engine.replay_buffer import Group
from engine.trajectory import Trajectory

PAD = 0


def _traj(uid: str, i: int, prompt: list[int], resp: list[int], versions: list[int], reward: float) -> Trajectory:
    logprobs = [-0.1 * (k + 1) for k in range(len(resp))]
    return Trajectory(uid, i, prompt, resp, logprobs, versions, finish_reason="stop", reward=reward)


def _groups() -> list[Group]:
    a = [
        _traj("a", 0, [1, 5, 6], [7, 8], [3, 3], 1.0),
        _traj("a", 1, [1, 5, 6], [9], [3], 0.0),
    ]
    b = [
        _traj("b", 0, [1, 4], [11, 12, 13, 14], [2, 2, 3, 3], 0.0),  # continued across versions 2 -> 3
        _traj("b", 1, [1, 4], [15], [3], 1.0),
    ]
    return [Group("a", tuple(a)), Group("b", tuple(b))]


def test_targets_masks_and_logprobs_line_up() -> None:
    batch = collate(_groups(), current_version=3, staleness="keep", pad_id=PAD)
    assert batch.input_ids.tolist() == [
        [1, 5, 6, 7, 8, 0],
        [1, 5, 6, 9, 0, 0],
        [1, 4, 11, 12, 13, 14],
        [1, 4, 15, 0, 0, 0],
    ]
    targets = batch.input_ids[:, 1:]
    for i, traj in enumerate(t for g in _groups() for t in g.trajectories):
        on = batch.loss_mask[i].bool()
        assert targets[i][on].tolist() == traj.response_ids
        assert batch.rollout_logp[i][on].tolist() == pytest.approx(traj.logprobs)
        assert batch.versions[i][batch.versions[i] >= 0].tolist() == traj.versions
    assert (batch.versions >= 0).sum(dim=1).tolist() == [2, 1, 4, 1]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert batch.prompt_uids == ["a", "a", "b", "b"]


def test_stale_tokens_leave_the_loss_in_exclude_mode() -> None:
    batch = collate(_groups(), current_version=3, staleness="exclude", pad_id=PAD)
    assert batch.loss_mask[2].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # the two version-2 tokens are out
    assert batch.versions[2].tolist() == [-1, 2, 2, 3, 3]


def test_unfinished_or_unscored_trajectories_are_refused() -> None:
    groups = _groups()
    groups[0].trajectories[1].reward = None
    with pytest.raises(ValueError, match=r"unscored \[\('a', 1\)\]"):
        collate(groups, 3, "keep", PAD)
    groups = _groups()
    groups[1].trajectories[0].finish_reason = "length_budget"
    with pytest.raises(ValueError, match=r"unfinished \[\('b', 0\)\]"):
        collate(groups, 3, "keep", PAD)


def test_grpo_advantages_over_groups() -> None:
    batch = with_advantages(collate(_groups(), 3, "keep", PAD), AlgoConfig(name="grpo"))
    s = torch.tensor([1.0, 0.0]).std().item()
    assert batch.advantages.tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-4)


def test_kl_needs_reference_logprobs() -> None:
    with pytest.raises(ValueError, match="ref_logp"):
        with_advantages(collate(_groups(), 3, "keep", PAD), AlgoConfig(name="reinforce_pp", kl_coef=0.1))


def test_ppo_advantages_come_from_the_critics_values_with_their_targets() -> None:
    batch = collate(_groups(), 3, "keep", PAD)
    with pytest.raises(ValueError, match="old_values"):
        with_advantages(batch, AlgoConfig(name="ppo"))
    batch.old_values = torch.zeros_like(batch.loss_mask)
    with_advantages(batch, AlgoConfig(name="ppo", lam=1.0))
    # Zero values, gamma = lambda = 1: each token's return is its sequence's reward.
    assert torch.equal(batch.returns, batch.rewards[:, None] * batch.loss_mask)
    assert batch.advantages.shape == batch.loss_mask.shape
