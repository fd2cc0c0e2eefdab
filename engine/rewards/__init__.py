"""Rewards: format and think, Kimi length reward, repeat penalty, user functions, and their weighted sum.

`RewardScorer(cfg, task).score_group(...)` is the entry point the rollout uses; the other names
are the pieces it is built from, exported for tests and for custom compositions.
"""

from __future__ import annotations

from engine.rewards.compose import (
    BUILTIN_TERMS,
    GROUP_TERMS,
    TASK_INPUTS,
    GroupInput,
    GroupScores,
    RewardConfig,
    RewardScorer,
    RewardTerm,
    score_group,
)
from engine.rewards.format import extract_tagged_answer, format_reward, think_reward
from engine.rewards.length import LengthRewardConfig, kimi_length_rewards
from engine.rewards.plugins import PluginReward, RewardPluginError, load_reward_fn

__all__ = [
    "BUILTIN_TERMS",
    "GROUP_TERMS",
    "TASK_INPUTS",
    "GroupInput",
    "GroupScores",
    "LengthRewardConfig",
    "PluginReward",
    "RewardConfig",
    "RewardPluginError",
    "RewardScorer",
    "RewardTerm",
    "extract_tagged_answer",
    "format_reward",
    "kimi_length_rewards",
    "load_reward_fn",
    "score_group",
    "think_reward",
]
