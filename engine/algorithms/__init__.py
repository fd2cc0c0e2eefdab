"""Advantage estimators, KL estimators, policy/value losses and taken-token logprobs."""

from engine.algorithms.config import ALGORITHMS, AlgoConfig, compute_advantages, policy_loss

__all__ = ["ALGORITHMS", "AlgoConfig", "compute_advantages", "policy_loss"]
