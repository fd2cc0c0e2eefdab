"""Verifiable tasks: seeded generators with disjoint splits, and their rewards."""

from __future__ import annotations

from typing import Any

from checkpoint_engine.contracts.config import ConfigError
from engine.tasks.addition import AdditionTask
from engine.tasks.base import Sample, Split, Task
from engine.tasks.jsonl import JsonlTask
from engine.tasks.scratchpad import ScratchpadTask
from engine.tasks.sort import SortTask

TASKS: dict[str, type] = {"addition": AdditionTask, "sort": SortTask, "jsonl": JsonlTask, "scratchpad": ScratchpadTask}


def make_task(name: str, **options: Any) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "AdditionTask", "JsonlTask", "Sample", "ScratchpadTask", "SortTask", "Split", "Task", "make_task"]
