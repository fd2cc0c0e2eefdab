"""The `task` section of the run's config, and the task it makes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Section
from engine.tasks import JsonlTask, Task, make_task
from engine.tasks.code import CodeTask
from engine.tasks.jsonl import PRESETS
from engine.tasks.sandbox import SandboxConfig

# The tasks' own limits: addition operands have <= 9 digits, sorted lists <= 32 items.
MAX_DIGITS = {"addition": 9, "scratchpad": 9, "sort": 32}
FILE_TASKS = (*PRESETS, "code")  # the tasks that read task.path


class TaskConfig(Section):
    KEY = "task"
    name: Literal["scratchpad", "addition", "sort", "jsonl", "gsm8k", "math", "code"] = "scratchpad"
    path: str | None = None  # JSONL records for the file tasks (jsonl, gsm8k, math, code); must be null otherwise
    pool_size: int = Field(8000, ge=1)  # RL prompt pool (the cold start draws its tenth from it)
    heldout_size: int = Field(256, ge=1)  # held-out prompts for evaluation (a disjoint split)
    digits: int = Field(6, ge=1)  # scratchpad and addition: max digits of each operand; sort: list length
    # partial: credit per right digit / position (addition, sort), per passed test (code); "correct" stays exact.
    reward: Literal["exact", "partial"] = "partial"
    # Render each prompt as a user turn through the model's chat template (`engine.tokenizer`).
    chat_template: bool = False
    sandbox: SandboxConfig = SandboxConfig()  # the limits of each program run (code)

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        file_task = self.name in FILE_TASKS
        if self.name in PRESETS and self.reward != "exact":
            raise ConfigError(
                f"task.reward={self.reward!r} applies to addition, sort and code; "
                f"{self.name} answers are verified exactly"
            )
        if file_task and self.path is None:
            keys = (
                ("prompt", "tests")
                if self.name == "code"
                else (PRESETS[self.name].prompt_key, PRESETS[self.name].answer_key)
            )
            raise ConfigError(
                f"task.path is required for task.name={self.name!r} (a JSONL file of records with fields "
                f"{keys[0]!r} and {keys[1]!r})"
            )
        if not file_task and self.path is not None:
            raise ConfigError(
                f"task.path applies only to task.name in {sorted(FILE_TASKS)}, not {self.name!r}; set task.path=null"
            )
        if self.name != "code" and self.sandbox != SandboxConfig():
            raise ConfigError(f"task.sandbox applies only to task.name='code', not {self.name!r}; leave it unset")
        limit = MAX_DIGITS.get(self.name)
        if limit is not None and self.digits > limit:
            raise ConfigError(f"task.digits must be in [1, {limit}] for task.name={self.name!r}, got {self.digits}")
        return self

    @property
    def answers_span_lines(self) -> bool:
        """Whether a response's answer runs over several lines (worked steps, a program)."""
        return self.name == "code" or (self.name in PRESETS and PRESETS[self.name].answers_span_lines)

    def make(self) -> Task:
        """task.digits means operand digits for scratchpad and addition, and list length for sort."""
        if self.name == "code":
            return CodeTask(path=self.path, sandbox=self.sandbox, reward_kind=self.reward)
        if self.name in PRESETS:
            preset = PRESETS[self.name]
            return JsonlTask(self.path, preset.prompt_key, preset.answer_key, preset.prompt_template, name=self.name)
        if self.name == "scratchpad":
            return make_task("scratchpad", max_digits=self.digits, reward_kind=self.reward)
        if self.name == "sort":
            return make_task("sort", max_len=self.digits, min_len=min(3, self.digits), reward_kind=self.reward)
        return make_task("addition", max_digits=self.digits, reward_kind=self.reward)
