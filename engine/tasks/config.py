"""The `task` section of the run's config, and the task it makes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Section
from engine.tasks import Task, make_task

# The tasks' own limits: addition operands have <= 9 digits, sorted lists <= 32 items.
MAX_DIGITS = {"addition": 9, "scratchpad": 9, "sort": 32}


class TaskConfig(Section):
    KEY = "task"
    name: Literal["scratchpad", "addition", "sort", "jsonl"] = "scratchpad"
    path: str | None = None  # JSONL records for task jsonl; must be null otherwise
    pool_size: int = Field(8000, ge=1)  # RL prompt pool (the cold start draws its tenth from it)
    heldout_size: int = Field(256, ge=1)  # held-out prompts for evaluation (a disjoint split)
    digits: int = Field(6, ge=1)  # scratchpad and addition: max digits of each operand; sort: list length
    # partial: credit per right digit / position (addition, sort); "correct" stays exact.
    reward: Literal["exact", "partial"] = "partial"
    # Render each prompt as a user turn through the model's chat template (`engine.tokenizer`).
    chat_template: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if self.name == "jsonl" and self.reward != "exact":
            raise ConfigError(
                f"task.reward={self.reward!r} applies to addition and sort; jsonl answers are verified exactly"
            )
        if self.name == "jsonl" and self.path is None:
            raise ConfigError("task.path is required for task.name='jsonl' (a JSONL file of prompt/answer records)")
        if self.name != "jsonl" and self.path is not None:
            raise ConfigError(f"task.path applies only to task.name='jsonl', not {self.name!r}; set task.path=null")
        limit = MAX_DIGITS.get(self.name)
        if limit is not None and self.digits > limit:
            raise ConfigError(f"task.digits must be in [1, {limit}] for task.name={self.name!r}, got {self.digits}")
        return self

    def make(self) -> Task:
        """task.digits means operand digits for scratchpad and addition, and list length for sort."""
        if self.name == "jsonl":
            return make_task("jsonl", path=self.path)
        if self.name == "scratchpad":
            return make_task("scratchpad", max_digits=self.digits, reward_kind=self.reward)
        if self.name == "sort":
            return make_task("sort", max_len=self.digits, min_len=min(3, self.digits), reward_kind=self.reward)
        return make_task("addition", max_digits=self.digits, reward_kind=self.reward)
