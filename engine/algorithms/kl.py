"""KL estimators of KL(pi_theta || pi_ref) from per-token logprobs, with x = pi_ref / pi_theta:
k1 = -log x (unbiased, can be negative), k2 = (log x)^2 / 2, k3 = x - log x - 1 (unbiased, >= 0)."""

from __future__ import annotations

from typing import Literal

import torch

KlEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[KlEstimator, ...] = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KlEstimator = "k3") -> torch.Tensor:
    log_x = ref_logp - logp
    if kind == "k1":
        return -log_x
    if kind == "k2":
        return log_x.pow(2) / 2
    if kind == "k3":
        # Clamp keeps exp finite when the policies have drifted far apart.
        return torch.exp(log_x.clamp(max=20.0)) - log_x - 1
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
