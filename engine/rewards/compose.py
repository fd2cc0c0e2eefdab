"""The total reward of one group: a weighted sum of terms, with a per-term breakdown for logging.

Consumes one prompt's G finished responses (text, token length, finish reason), the prompt's task
`Sample`, the iteration and the `Task`; produces `GroupScores`: the total per response, each
term's weighted contribution per response (they sum to the total), and whether each response is
correct (the task's reward >= `correct_threshold`), which the length term and the prompt
samplers' success rates use. Terms:

- listed in `RewardConfig.terms`, each `weight * f(response, sample)`: `task` (the task's own
  reward), `format` (`<think>..</think><answer>..</answer>`), or a user function by import path;
- `length`: the Kimi group length reward times `RewardConfig.length.scale(iteration)`;
- `repeat`: `-repeat_penalty` for a response stopped by repeat detection (finish reason "repeat").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from engine.rewards.format import extract_tagged_answer, format_reward
from engine.rewards.length import LengthRewardConfig, kimi_length_rewards
from engine.rewards.plugins import is_import_path, load_reward_fn
from engine.tasks.base import Sample, Task
from engine.trajectory import FINISH_REASONS, UNFINISHED

BUILTIN_TERMS: tuple[str, ...] = ("task", "format")
GROUP_TERMS: tuple[str, ...] = ("length", "repeat")  # computed from RewardConfig.length / repeat_penalty
TaskInput = Literal["response", "answer"]
TASK_INPUTS: tuple[TaskInput, ...] = ("response", "answer")


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


@dataclass(frozen=True)
class RewardTerm:
    """`weight * source(response, sample)`; `source` is "task", "format" or "package.module:function"."""

    source: str
    weight: float = 1.0
    name: str | None = None  # key in the breakdown; defaults to `source`

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not (self.source in BUILTIN_TERMS or is_import_path(self.source)):
            raise ValueError(
                f"reward.terms[].source must be one of {BUILTIN_TERMS} or 'package.module:function', "
                f"got {self.source!r}"
            )
        if not _is_number(self.weight):
            raise ValueError(f"reward.terms[{self.key!r}].weight must be a number, got {self.weight!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"reward.terms[].name must be a non-empty string or null, got {self.name!r}")

    @property
    def key(self) -> str:
        return self.name or self.source


@dataclass(frozen=True)
class RewardConfig:
    terms: tuple[RewardTerm, ...] = (RewardTerm("task"),)
    length: LengthRewardConfig = field(default_factory=LengthRewardConfig)
    repeat_penalty: float = 0.0  # subtracted from the total of a trajectory stopped for repetition
    correct_threshold: float = 1.0  # task reward >= this counts as correct (length term, success rates)
    task_input: TaskInput = "response"  # "answer": the task scores only the <answer> part (0 if malformed)
    think_in_prompt: bool = False  # the chat template opens <think> itself (format and answer extraction)

    def __post_init__(self) -> None:
        if not isinstance(self.terms, tuple) or not all(isinstance(t, RewardTerm) for t in self.terms):
            raise ValueError(f"reward.terms must be a tuple of RewardTerm, got {self.terms!r}")
        if not self.terms:
            raise ValueError(f"reward.terms must list at least one term (e.g. {RewardTerm('task')})")
        keys = [t.key for t in self.terms]
        clashes = sorted({k for k in keys if keys.count(k) > 1 or k in GROUP_TERMS})
        if clashes:
            raise ValueError(
                f"reward.terms names {clashes} are repeated or reserved ({GROUP_TERMS}); give each term a unique name"
            )
        if not isinstance(self.length, LengthRewardConfig):
            raise ValueError(f"reward.length must be a LengthRewardConfig, got {type(self.length).__name__}")
        if not _is_number(self.repeat_penalty) or self.repeat_penalty < 0:
            raise ValueError(
                f"reward.repeat_penalty must be a number >= 0 (it is subtracted), got {self.repeat_penalty!r}"
            )
        if not _is_number(self.correct_threshold):
            raise ValueError(f"reward.correct_threshold must be a number, got {self.correct_threshold!r}")
        if self.task_input not in TASK_INPUTS:
            raise ValueError(f"reward.task_input must be one of {TASK_INPUTS}, got {self.task_input!r}")
        if not isinstance(self.think_in_prompt, bool):
            raise ValueError(f"reward.think_in_prompt must be true or false, got {self.think_in_prompt!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RewardConfig:
        """Build from plain data (the composed Hydra config); unknown keys are errors."""
        _check_keys("reward", d, cls)
        kwargs = dict(d)
        if "terms" in kwargs:
            terms = []
            for i, t in enumerate(kwargs["terms"]):
                _check_keys(f"reward.terms[{i}]", t, RewardTerm)
                terms.append(RewardTerm(**t))
            kwargs["terms"] = tuple(terms)
        if "length" in kwargs:
            _check_keys("reward.length", kwargs["length"], LengthRewardConfig)
            kwargs["length"] = LengthRewardConfig(**kwargs["length"])
        return cls(**kwargs)


def _check_keys(where: str, d: object, cls: type) -> None:
    valid = sorted(f.name for f in fields(cls))
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping with keys from {valid}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; valid keys: {valid}")


@dataclass(frozen=True)
class GroupScores:
    totals: list[float]
    terms: dict[str, list[float]]  # weighted contribution of each term; summed over terms = totals
    correct: list[bool]

    def means(self) -> dict[str, float]:
        """Group means for logging: each term, `total` and `accuracy`."""
        n = len(self.totals)
        out = {key: sum(values) / n for key, values in self.terms.items()}
        out["total"] = sum(self.totals) / n
        out["accuracy"] = sum(self.correct) / n
        return out


class RewardScorer:
    """Scores groups for one task; user functions are imported once, here, so a bad path fails at start-up."""

    def __init__(self, cfg: RewardConfig, task: Task) -> None:
        self.cfg = cfg
        self.task = task
        self._fns: dict[str, Callable[[str, Sample], float]] = {}
        for term in cfg.terms:
            if term.source == "format":
                self._fns[term.key] = self._format
            elif term.source == "task":
                self._fns[term.key] = self._task
            else:
                self._fns[term.key] = load_reward_fn(term.source)

    def _format(self, response: str, sample: Sample) -> float:
        return format_reward(response, think_in_prompt=self.cfg.think_in_prompt)

    def _task(self, response: str, sample: Sample) -> float:
        if self.cfg.task_input == "response":
            return float(self.task.reward(response, sample))
        answer = extract_tagged_answer(response, think_in_prompt=self.cfg.think_in_prompt)
        return 0.0 if answer is None else float(self.task.reward(answer, sample))

    def score_group(
        self,
        responses: Sequence[str],
        sample: Sample,
        finish_reasons: Sequence[str],
        lengths: Sequence[int],
        iteration: int,
    ) -> GroupScores:
        """Score the G finished responses to `sample`; `lengths` are response lengths in tokens."""
        _check_group(responses, finish_reasons, lengths)
        task_rewards = [self._task(r, sample) for r in responses]
        correct = [r >= self.cfg.correct_threshold for r in task_rewards]
        terms: dict[str, list[float]] = {}
        for term in self.cfg.terms:
            fn = self._fns[term.key]
            raw = task_rewards if term.source == "task" else [fn(r, sample) for r in responses]
            terms[term.key] = [term.weight * v for v in raw]
        if self.cfg.length.enabled:
            scale = self.cfg.length.scale(iteration)
            terms["length"] = [scale * v for v in kimi_length_rewards(lengths, correct)]
        if self.cfg.repeat_penalty:
            terms["repeat"] = [-self.cfg.repeat_penalty if f == "repeat" else 0.0 for f in finish_reasons]
        totals = [sum(values[i] for values in terms.values()) for i in range(len(responses))]
        return GroupScores(totals=totals, terms=terms, correct=correct)


def _check_group(responses: Sequence[str], finish_reasons: Sequence[str], lengths: Sequence[int]) -> None:
    if not responses:
        raise ValueError("a group needs at least one response")
    if not len(responses) == len(finish_reasons) == len(lengths):
        raise ValueError(
            f"{len(responses)} responses, {len(finish_reasons)} finish reasons, {len(lengths)} lengths; "
            "they must be equal"
        )
    for reason in finish_reasons:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if reason in UNFINISHED:
            raise ValueError(f"cannot score an unfinished trajectory (finish reason {reason!r}); continue it first")


def score_group(
    responses: Sequence[str],
    sample: Sample,
    finish_reasons: Sequence[str],
    lengths: Sequence[int],
    *,
    iteration: int,
    cfg: RewardConfig,
    task: Task,
) -> GroupScores:
    """One-off form of `RewardScorer(cfg, task).score_group(...)`."""
    return RewardScorer(cfg, task).score_group(responses, sample, finish_reasons, lengths, iteration)
