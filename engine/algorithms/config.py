"""Which estimator and loss to train with, and the per-algorithm rules that tie them together.

`compute_advantages` runs at batch-building time (no gradients); `policy_loss` in the train step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Section
from engine.algorithms import advantages as adv
from engine.algorithms.kl import KL_ESTIMATORS, KlEstimator, kl_estimate
from engine.algorithms.losses import AGGREGATIONS, Aggregation, clipped_policy_loss, kimi_loss

AlgoName = Literal["kimi", "grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"]
ALGORITHMS: tuple[AlgoName, ...] = ("kimi", "grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo")
# Each estimator's own aggregation (what its paper does) when the config leaves it unset.
NATURAL_AGGREGATION: dict[str, Aggregation] = {
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_sum",
    "rloo": "token_mean",
    "reinforce_pp": "token_mean",
    "ppo": "token_mean",
}


@dataclass(frozen=True)
class AlgoConfig:
    name: AlgoName = "kimi"
    tau: float = 0.1  # kimi: weight of the squared log-ratio to pi_old
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: KlEstimator = "k3"
    aggregation: Aggregation | None = None  # None: the algorithm's own (NATURAL_AGGREGATION)
    norm_tokens: float = 1.0  # seq_sum divisor, e.g. the generation budget for Dr.GRPO
    gamma: float = 1.0  # ppo: GAE's discount and lambda
    lam: float = 0.95
    vf_coef: float = 0.5  # ppo: weight of the value loss
    value_clip: float = 0.2  # ppo: how far a value may move from the iteration's start per update
    stale_ratio_cap: float = 2.0  # rollout.staleness=keep: cap of an older token's weight pi_old / pi_rollout

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"algo.name must be one of {ALGORITHMS}, got {self.name!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algo.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"algo.aggregation must be one of {AGGREGATIONS} or null, got {self.aggregation!r}")
        if self.name == "kimi" and self.aggregation is not None:
            raise ValueError("algo.aggregation does not apply to kimi (its loss is per sequence); leave it null")
        if self.name == "kimi" and self.tau <= 0:
            raise ValueError(f"algo.tau must be > 0 for kimi, got {self.tau}")
        if self.name == "reinforce_pp" and self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.stale_ratio_cap <= 0:
            raise ValueError(f"algo.stale_ratio_cap must be > 0, got {self.stale_ratio_cap}")
        for name in ("clip_low", "clip_high"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"algo.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_critic(self) -> bool:
        return self.name == "ppo"

    @property
    def loss_aggregation(self) -> Aggregation:
        return self.aggregation or NATURAL_AGGREGATION[self.name]


def compute_advantages(
    cfg: AlgoConfig,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages for a batch of sequences in group-major order: [batch] or [batch, tokens]."""
    groups = rewards.view(-1, group_size)
    if cfg.name in ("kimi", "dr_grpo"):
        return adv.dr_grpo(groups).flatten()  # kimi's mean-reward baseline is the same quantity
    if cfg.name == "grpo":
        return adv.grpo(groups).flatten()
    if cfg.name == "rloo":
        return adv.rloo(groups).flatten()
    if cfg.name == "reinforce_pp":
        return adv.reinforce_pp(rewards, _kl_in_reward(cfg, mask, old_logp, ref_logp), mask, cfg.kl_coef)
    if values is None:
        raise ValueError("ppo needs critic values for GAE")
    return ppo_targets(cfg, rewards, mask, values, old_logp=old_logp, ref_logp=ref_logp)[0]


def _kl_in_reward(
    cfg: AlgoConfig, mask: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None
) -> torch.Tensor:
    if not cfg.kl_coef:
        return torch.zeros_like(mask, dtype=torch.float32)
    if old_logp is None or ref_logp is None:
        raise ValueError(f"{cfg.name} with kl_coef > 0 needs old and reference logprobs")
    return kl_estimate(old_logp, ref_logp, cfg.kl_estimator)


def ppo_targets(
    cfg: AlgoConfig,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token advantages (GAE over the critic's values, whitened over the batch's tokens) and
    the value targets (returns). The sequence reward lands on its last token, the KL on every token."""
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & mask.bool()
    token_rewards = last * rewards[:, None] - cfg.kl_coef * _kl_in_reward(cfg, mask, old_logp, ref_logp) * mask
    advantages, returns = adv.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    return adv.batch_normalize(advantages, mask), returns


def policy_loss(
    cfg: AlgoConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    ref_logp: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar to minimise for this algorithm on one (micro-)batch; `token_weights` weigh the tokens
    older versions sampled (kimi's per-sequence loss takes none: the config keeps such tokens out of it)."""
    if cfg.name == "kimi":
        if rewards is None or group_size is None:
            raise ValueError("kimi's loss needs the rewards and the group size")
        return kimi_loss(logp, old_logp, rewards.view(-1, group_size), mask, cfg.tau)
    # REINFORCE++ and PPO put the KL into the reward; GRPO-style estimators add it to the loss.
    kl_in_loss = cfg.name in ("grpo", "dr_grpo", "rloo")
    return clipped_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        aggregation=cfg.loss_aggregation,
        norm_tokens=cfg.norm_tokens,
        ref_logp=ref_logp,
        kl_coef=cfg.kl_coef if kl_in_loss else 0.0,
        kl_estimator=cfg.kl_estimator,
        token_weights=token_weights,
    )


class AlgoSection(Section):
    """The `algo` section of the run's config; the trainer turns it into an `AlgoConfig` (`to_algo`)."""

    KEY = "algo"
    name: AlgoName = "kimi"
    tau: float = 0.1  # kimi: weight of the squared log-ratio to the iteration's starting policy
    clip_low: float = 0.2  # clipped estimators (not kimi)
    clip_high: float = 0.2
    kl_coef: float = Field(0.0, ge=0)  # > 0: a KL to a reference model in the loss
    kl_estimator: KlEstimator = "k3"
    aggregation: str | None = None  # None: the algorithm's own (NATURAL_AGGREGATION)
    # ppo: a value head on the policy's last hidden states (the critic), trained with the policy.
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.5, gt=0)
    value_clip: float = Field(0.2, gt=0)
    # rollout.staleness=keep: a token an older version sampled weighs min(pi_old / pi_rollout, this).
    stale_ratio_cap: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> AlgoSection:
        if self.name == "kimi" and self.kl_coef > 0:
            raise ConfigError(
                "algo.kl_coef cannot take effect with algo.name='kimi' (its loss has no KL term; tau plays that role)"
            )
        self.to_algo()
        return self

    def to_algo(self, norm_tokens: float = 1.0) -> AlgoConfig:
        """The maths' config; `norm_tokens` is the seq_sum divisor (Dr.GRPO: the generation budget)."""
        try:
            return AlgoConfig(
                name=self.name,
                tau=self.tau,
                clip_low=self.clip_low,
                clip_high=self.clip_high,
                kl_coef=self.kl_coef,
                kl_estimator=self.kl_estimator,
                aggregation=self.aggregation,  # AlgoConfig checks the value
                stale_ratio_cap=self.stale_ratio_cap,
                gamma=self.gamma,
                lam=self.lam,
                vf_coef=self.vf_coef,
                value_clip=self.value_clip,
                norm_tokens=norm_tokens,
            )
        except ValueError as e:  # its messages already name algo.<key>
            raise ConfigError(str(e)) from e
