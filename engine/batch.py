"""Training batches from finished groups: padded token tensors, masks, logprobs and advantages.

Consumes complete groups (every trajectory finished and scored: `reward` set) from the replay
buffer; produces a `TrainBatch` whose per-token tensors are aligned with the *targets*
`input_ids[:, 1:]`: position t holds what belongs to token t+1 (its mask, its rollout logprob).
No processes and no model: the trainer fills `old_logp` (and `ref_logp`) by recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.algorithms import AlgoConfig, compute_advantages
from engine.algorithms.config import ppo_targets
from engine.replay_buffer import Group, StalenessMode, loss_mask


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    loss_mask: torch.Tensor  # [B, L-1] 1.0 where the target is a response token that trains
    rollout_logp: torch.Tensor  # [B, L-1] sampling logprob of each target (0 off the response)
    versions: torch.Tensor  # [B, L-1] weight version that sampled each target (-1 off the response)
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B] or [B, L-1]
    group_size: int
    prompt_uids: list[str]
    old_logp: torch.Tensor | None = None  # [B, L-1] pi_old, recomputed by the trainer
    ref_logp: torch.Tensor | None = None  # [B, L-1] reference policy, when a KL term needs it
    token_weights: torch.Tensor | None = None  # [B, L-1] importance weights of older versions' tokens
    old_values: torch.Tensor | None = None  # [B, L-1] ppo: the critic's values at the iteration's start
    returns: torch.Tensor | None = None  # [B, L-1] ppo: the critic's targets

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(
    groups: Sequence[Group],
    current_version: int,
    staleness: StalenessMode,
    pad_id: int,
    max_staleness: int | None = None,
) -> TrainBatch:
    """Pad the groups' trajectories (group-major order) into tensors; advantages are left empty."""
    if not groups:
        raise ValueError("cannot build a batch from no groups")
    sizes = {len(g.trajectories) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"all groups must have the same number of samples, got sizes {sorted(sizes)}")
    trajs = [t for g in groups for t in g.trajectories]
    unscored = [t.key for t in trajs if t.reward is None]
    unfinished = [t.key for t in trajs if not t.finished]
    if unscored or unfinished:
        raise ValueError(
            f"batch needs finished, scored trajectories; unscored {unscored[:4]}, unfinished {unfinished[:4]}"
        )
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    b = len(trajs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, length - 1)
    rollout_logp = torch.zeros(b, length - 1)
    versions = torch.full((b, length - 1), -1, dtype=torch.long)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, : p + r] = torch.tensor(list(t.prompt_ids) + list(t.response_ids))
        span = slice(p - 1, p - 1 + r)  # targets p..p+r-1 are the response tokens
        mask[i, span] = torch.tensor(loss_mask(t, current_version, staleness, max_staleness), dtype=torch.float32)
        rollout_logp[i, span] = torch.tensor(t.logprobs, dtype=torch.float32)
        versions[i, span] = torch.tensor(t.versions)
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    return TrainBatch(
        input_ids, mask, rollout_logp, versions, rewards, torch.zeros(b), sizes.pop(), [t.prompt_uid for t in trajs]
    )


def with_advantages(batch: TrainBatch, algo: AlgoConfig) -> TrainBatch:
    """Fill `batch.advantages` for `algo` (old/ref logprobs where it needs them); under ppo from the
    critic's values at the iteration's start (`old_values`), with the value targets (`returns`)."""
    if algo.needs_reference and batch.ref_logp is None:
        raise ValueError(f"{algo.name} with kl_coef > 0 needs ref_logp in the batch")
    old_logp = batch.old_logp if batch.old_logp is not None else batch.rollout_logp
    if algo.needs_critic:
        if batch.old_values is None:
            raise ValueError(f"{algo.name} needs the critic's values (old_values) in the batch")
        batch.advantages, batch.returns = ppo_targets(
            algo, batch.rewards, batch.loss_mask, batch.old_values, old_logp=old_logp, ref_logp=batch.ref_logp
        )
        return batch
    batch.advantages = compute_advantages(
        algo, batch.rewards, batch.loss_mask, batch.group_size, old_logp=old_logp, ref_logp=batch.ref_logp
    )
    return batch


_TENSOR_FIELDS = ("input_ids", "loss_mask", "rollout_logp", "versions", "rewards", "advantages")


def save_batch(batch: TrainBatch, path: str | Path) -> None:
    """Write a batch for the trainer ranks (plain tensors and lists: loadable with weights_only)."""
    state = {name: getattr(batch, name) for name in _TENSOR_FIELDS}
    torch.save({**state, "group_size": batch.group_size, "prompt_uids": list(batch.prompt_uids)}, path)


def load_batch(path: str | Path) -> TrainBatch:
    state = torch.load(path, weights_only=True)
    return TrainBatch(
        **{name: state[name] for name in _TENSOR_FIELDS},
        group_size=state["group_size"],
        prompt_uids=state["prompt_uids"],
    )
