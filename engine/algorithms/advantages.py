"""Advantage estimators. Group estimators take rewards shaped [groups, G] (G samples of one prompt).

Formulas (ARCHITECTURE.md): GRPO A = (r - mean) / std; Dr.GRPO A = r - mean; RLOO
A_i = r_i - mean_{j != i} r_j; REINFORCE++ normalises over the whole batch; PPO uses GAE.
"""

from __future__ import annotations

import torch


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"group rewards must be [groups, samples], got shape {list(rewards.shape)}")


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) per group; std is the unbiased sample std, as in the GRPO paper."""
    _check_groups(rewards)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (std + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean per group: no std, which biases towards easy and hard prompts (Dr.GRPO)."""
    _check_groups(rewards)
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r_i - mean of the other G-1 rewards."""
    _check_groups(rewards)
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def batch_normalize(values: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Whiten over the whole batch (REINFORCE++), counting only masked-in entries."""
    if mask is None:
        mask = torch.ones_like(values)
    n = mask.sum().clamp_min(1)
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / n
    return (values - mean) / (var.sqrt() + eps) * mask


def reinforce_pp(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++: per-token return = r (at the end) - kl_coef * sum of the KL still ahead, normalised
    over the global batch. `rewards` [batch], `kl` and `mask` [batch, tokens]."""
    token_rewards = -kl_coef * kl * mask
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & mask.bool()
    token_rewards = token_rewards + last * rewards[:, None]
    returns = token_rewards.flip(1).cumsum(1).flip(1) * mask  # gamma = 1
    return batch_normalize(returns, mask, eps)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on [batch, tokens]; V after the last real token is 0.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = sum_l (gamma lam)^l delta_{t+l}.
    Returns (advantages, returns = advantages + values), both zero outside `mask`.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
