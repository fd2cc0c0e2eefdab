"""A rollout trajectory: what vLLM produced for one sample of one prompt, across iterations.

A partial trajectory (finish reason `length_budget`) is continued next iteration from
prompt + response so far; every response token keeps the weight version that sampled it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from checkpoint_engine.contracts.vllm_protocol import FINISH_REASONS, UNFINISHED, FinishReason

__all__ = ["FINISH_REASONS", "UNFINISHED", "FinishReason", "Trajectory"]


@dataclass
class Trajectory:
    prompt_uid: str  # the task sample's uid: the group key
    sample_index: int  # which of the G samples of the prompt
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # sampling logprob of each response token
    versions: list[int] = field(default_factory=list)  # weight version that sampled each token
    finish_reason: FinishReason = "length_budget"
    reward: float | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if not len(self.response_ids) == len(self.logprobs) == len(self.versions):
            raise ValueError(
                f"trajectory {self.key}: {len(self.response_ids)} tokens, {len(self.logprobs)} logprobs, "
                f"{len(self.versions)} versions; they must be equal"
            )

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt_uid, self.sample_index)

    @property
    def finished(self) -> bool:
        return self.finish_reason not in UNFINISHED

    def extend(self, ids: list[int], logprobs: list[float], version: int, finish_reason: FinishReason) -> None:
        """Append one iteration's continuation, stamped with the weight version that produced it."""
        if len(ids) != len(logprobs):
            raise ValueError(f"trajectory {self.key}: {len(ids)} new tokens but {len(logprobs)} logprobs")
        self.response_ids.extend(ids)
        self.logprobs.extend(logprobs)
        self.versions.extend([version] * len(ids))
        self.finish_reason = finish_reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(**d)
