"""Policy and value losses on padded token tensors [batch, tokens] with a 0/1 loss mask.

Every loss returns a scalar to minimise. Aggregation modes:
- `token_mean`: mean over all unmasked tokens of the batch (DAPO);
- `seq_mean_token_mean`: mean over each sequence's tokens, then over sequences (GRPO's 1/|o_i|);
- `seq_sum`: sum over each sequence's tokens / `norm_tokens`, then mean over sequences (Dr.GRPO,
  where `norm_tokens` is a constant such as the generation budget).
"""

from __future__ import annotations

from typing import Literal

import torch

from engine.algorithms.kl import KlEstimator, kl_estimate

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum"]
AGGREGATIONS: tuple[Aggregation, ...] = ("token_mean", "seq_mean_token_mean", "seq_sum")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation, norm_tokens: float = 1.0) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1)
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        return per_seq.mean()
    if mode == "seq_sum":
        return ((values * mask).sum(dim=1) / norm_tokens).mean()
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def stale_token_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, versions: torch.Tensor, current_version: int, cap: float
) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap) for tokens an older version sampled.

    With `rollout.staleness=keep`, a continued trajectory's older tokens come from a policy other than
    pi_old, the one PPO's ratio is taken against: weighting them by pi_old / pi_rollout corrects the
    expectation, and the cap bounds the variance (truncated importance sampling). Every other token,
    padding included, weighs 1.
    """
    stale = (versions >= 0) & (versions != current_version)
    ratio = torch.exp(old_logp - rollout_logp).clamp(max=cap)
    return torch.where(stale, ratio, torch.ones_like(ratio))


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "seq_mean_token_mean",
    norm_tokens: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KlEstimator = "k3",
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """-w min(rho A, clip(rho, 1-clip_low, 1+clip_high) A) per token, plus kl_coef * KL to a reference.

    `advantages` may be [batch] (one per sequence) or [batch, tokens]; `token_weights` w (default 1)
    are importance weights of tokens sampled by an older policy (`stale_token_weights`).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    per_token = -surrogate if token_weights is None else -surrogate * token_weights
    if kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference logprobs (ref_logp)")
        per_token = per_token + kl_coef * kl_estimate(logp, ref_logp, kl_estimator)
    return aggregate(per_token, mask, aggregation, norm_tokens)


def kimi_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, tau: float
) -> torch.Tensor:
    """Kimi k1.5 online mirror descent for groups of k samples, no clipping, no critic.

    Rewards are [groups, k] and token tensors [groups * k, tokens] in group-major order. The
    gradient is 1/k sum_j [grad log pi(y_j|x) (r_j - mean r) - tau/2 grad (log pi(y_j|x)/pi_old(y_j|x))^2],
    with log pi(y|x) the sum of the response's token logprobs and pi_old the policy at the start
    of the iteration; averaged over groups.
    """
    groups, k = rewards.shape
    if logp.shape[0] != groups * k:
        raise ValueError(f"kimi_loss: {logp.shape[0]} sequences for rewards of shape {list(rewards.shape)}")
    mask = mask.to(logp.dtype)
    seq_logp = (logp * mask).sum(dim=1).view(groups, k)
    seq_old = (old_logp * mask).sum(dim=1).view(groups, k)
    baseline = rewards - rewards.mean(dim=1, keepdim=True)
    objective = baseline * seq_logp - tau / 2 * (seq_logp - seq_old).pow(2)
    return -objective.mean()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    aggregation: Aggregation = "token_mean",
) -> torch.Tensor:
    """PPO's clipped value loss: max of the plain and the clipped squared error, halved."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns).pow(2), (clipped - returns).pow(2))
    return aggregate(per_token, mask, aggregation)
