"""The total reward of one group: a weighted sum of terms, with a per-term breakdown for logging.

Consumes one prompt's G finished responses (text, token length, finish reason), the prompt's task
`Sample`, the iteration and the `Task`; produces `GroupScores`: the total per response, each
term's weighted contribution per response (they sum to the total), and whether each response is
correct (the task's reward >= `correct_threshold`), which the length term and the prompt
samplers' success rates use. Terms:

- listed in `RewardConfig.terms`, each `weight * f(response, sample)`: `task` (the task's own
  reward), `format` (`<think>..</think><answer>..</answer>`), `think` (`<think>..</think>` and then
  the answer), or a user function by import path;
- `length`: the Kimi group length reward times `RewardConfig.length.scale(iteration)`;
- `repeat`: `-repeat_penalty` for a response stopped by repeat detection (finish reason "repeat").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Self, TypeVar

from pydantic import Field, field_validator, model_validator

from checkpoint_engine.contracts.config import ConfigError, Section
from engine.rewards.format import extract_tagged_answer, format_reward, think_reward
from engine.rewards.length import LengthRewardConfig, kimi_length_rewards
from engine.rewards.plugins import is_import_path, load_reward_fn
from engine.tasks.base import Sample, Task
from engine.trajectory import FINISH_REASONS, UNFINISHED

BUILTIN_TERMS: tuple[str, ...] = ("task", "format", "think")
GROUP_TERMS: tuple[str, ...] = ("length", "repeat")  # computed from RewardConfig.length / repeat_penalty
TaskInput = Literal["response", "answer"]
TASK_INPUTS: tuple[TaskInput, ...] = ("response", "answer")
T = TypeVar("T")


class RewardTerm(Section):
    """`weight * source(response, sample)`; `source` is "task", "format", "think" or "package.module:function"."""

    KEY = "reward.terms[]"
    source: str
    weight: float = 1.0
    name: str | None = Field(None, min_length=1)  # key in the breakdown; defaults to `source`

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if not (source in BUILTIN_TERMS or is_import_path(source)):
            raise ValueError(
                f"reward.terms[].source must be one of {BUILTIN_TERMS} or 'package.module:function', got {source!r}"
            )
        return source

    @property
    def key(self) -> str:
        return self.name or self.source


class RewardConfig(Section):
    """The `reward` section: the terms of the total and the group terms' settings."""

    KEY = "reward"
    terms: tuple[RewardTerm, ...] = (RewardTerm(source="task"),)
    length: LengthRewardConfig = LengthRewardConfig()
    repeat_penalty: float = Field(0.0, ge=0)  # subtracted from the total of a trajectory stopped for repetition
    correct_threshold: float = 1.0  # task reward >= this counts as correct (length term, success rates)
    task_input: TaskInput = "response"  # "answer": the task scores only the <answer> part (0 if malformed)
    think_in_prompt: bool = False  # the chat template opens <think> itself (format, think, answer extraction)
    # Threads scoring a rollout's responses with the task at once (the code task's programs run in parallel).
    workers: int = Field(1, ge=1)

    @field_validator("terms", mode="before")
    @classmethod
    def _listed_terms(cls, terms: object) -> object:
        return tuple(terms) if isinstance(terms, list) else terms  # Hydra and JSON give lists

    @model_validator(mode="after")
    def _terms_are_unique(self) -> Self:
        if not self.terms:
            raise ConfigError("reward.terms must list at least one term (e.g. {source: task})")
        keys = [t.key for t in self.terms]
        clashes = sorted({k for k in keys if keys.count(k) > 1 or k in GROUP_TERMS})
        if clashes:
            raise ConfigError(
                f"reward.terms names {clashes} are repeated or reserved ({GROUP_TERMS}); give each term a unique name"
            )
        return self


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


@dataclass(frozen=True)
class GroupInput:
    """One prompt's G finished responses as `score_groups` takes them; `lengths` are in tokens."""

    responses: Sequence[str]
    sample: Sample
    finish_reasons: Sequence[str]
    lengths: Sequence[int]


class RewardScorer:
    """Scores groups for one task; user functions are imported once, here, so a bad path fails at start-up.
    With `workers` > 1 the task's rewards of all the groups scored together are computed by that many
    threads (math-verify's SIGALRM guard then does not run: it needs the main thread)."""

    def __init__(self, cfg: RewardConfig, task: Task) -> None:
        self.cfg = cfg
        self.task = task
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="reward") if cfg.workers > 1 else None
        self._fns: dict[str, Callable[[str, Sample], float]] = {}
        for term in cfg.terms:
            if term.source == "format":
                self._fns[term.key] = self._format
            elif term.source == "think":
                self._fns[term.key] = self._think
            elif term.source == "task":
                self._fns[term.key] = self._task
            else:
                self._fns[term.key] = load_reward_fn(term.source)

    def _format(self, response: str, sample: Sample) -> float:
        return format_reward(response, think_in_prompt=self.cfg.think_in_prompt)

    def _think(self, response: str, sample: Sample) -> float:
        return think_reward(response, think_in_prompt=self.cfg.think_in_prompt)

    def _task(self, response: str, sample: Sample) -> float:
        if self.cfg.task_input == "response":
            return float(self.task.reward(response, sample))
        answer = extract_tagged_answer(response, think_in_prompt=self.cfg.think_in_prompt)
        return 0.0 if answer is None else float(self.task.reward(answer, sample))

    def map(self, fn: Callable[[str, Sample], T], pairs: Sequence[tuple[str, Sample]]) -> list[T]:
        """`fn(response, sample)` for each pair, in order, by the scorer's workers."""
        if self._pool is None:
            return [fn(r, s) for r, s in pairs]
        return list(self._pool.map(lambda pair: fn(*pair), pairs))

    def score_groups(self, groups: Sequence[GroupInput], iteration: int) -> list[GroupScores]:
        """Score each group's finished responses; the task's rewards of all of them at once (see `workers`)."""
        for g in groups:
            _check_group(g.responses, g.finish_reasons, g.lengths)
        rewards = iter(self.map(self._task, [(r, g.sample) for g in groups for r in g.responses]))
        return [self._compose(g, [next(rewards) for _ in g.responses], iteration) for g in groups]

    def score_group(
        self,
        responses: Sequence[str],
        sample: Sample,
        finish_reasons: Sequence[str],
        lengths: Sequence[int],
        iteration: int,
    ) -> GroupScores:
        """Score the G finished responses to `sample`; `lengths` are response lengths in tokens."""
        return self.score_groups([GroupInput(responses, sample, finish_reasons, lengths)], iteration)[0]

    def _compose(self, group: GroupInput, task_rewards: list[float], iteration: int) -> GroupScores:
        responses = group.responses
        correct = [r >= self.cfg.correct_threshold for r in task_rewards]
        terms: dict[str, list[float]] = {}
        for term in self.cfg.terms:
            fn = self._fns[term.key]
            raw = task_rewards if term.source == "task" else [fn(r, group.sample) for r in responses]
            terms[term.key] = [term.weight * v for v in raw]
        if self.cfg.length.enabled:
            scale = self.cfg.length.scale(iteration)
            terms["length"] = [scale * v for v in kimi_length_rewards(group.lengths, correct)]
        if self.cfg.repeat_penalty:
            terms["repeat"] = [-self.cfg.repeat_penalty if f == "repeat" else 0.0 for f in group.finish_reasons]
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
