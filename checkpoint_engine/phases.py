"""The phase machine of one iteration, as plain data and pure functions (no etcd, no processes).

Order (ARCHITECTURE.md): TRAIN -> OFFLOAD -> EXPORT -> START_VLLM -> UPDATE_WEIGHTS -> ROLLOUT ->
TERMINATE_VLLM -> ONLOAD -> TRAIN of the next iteration. Iteration 0 starts at EXPORT of the
initial checkpoint. START_VLLM may overlap EXPORT; this machine records the order in which the
phases complete. Any phase may go to FAILED; FAILED only goes back to a phase by an explicit
recovery (`recover_to`), which the leader decides.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class Phase(enum.StrEnum):
    TRAIN = "TRAIN"
    OFFLOAD = "OFFLOAD"
    EXPORT = "EXPORT"
    START_VLLM = "START_VLLM"
    UPDATE_WEIGHTS = "UPDATE_WEIGHTS"
    ROLLOUT = "ROLLOUT"
    TERMINATE_VLLM = "TERMINATE_VLLM"
    ONLOAD = "ONLOAD"
    FAILED = "FAILED"


CYCLE: tuple[Phase, ...] = (
    Phase.TRAIN,
    Phase.OFFLOAD,
    Phase.EXPORT,
    Phase.START_VLLM,
    Phase.UPDATE_WEIGHTS,
    Phase.ROLLOUT,
    Phase.TERMINATE_VLLM,
    Phase.ONLOAD,
)
FIRST_PHASE = Phase.EXPORT  # iteration 0 exports the initial checkpoint


class IllegalTransition(ValueError):
    pass


@dataclass(frozen=True)
class PhaseState:
    """What `/timeshare/{job}/phase` holds. `weight_version` is the version vLLM serves (or will)."""

    iteration: int
    phase: Phase
    weight_version: int
    started_at: float = field(default_factory=time.time)
    schema: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phase": self.phase.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseState:
        if d.get("schema") != 1:
            raise ValueError(f"phase record schema {d.get('schema')!r} is not understood (expected 1)")
        return cls(iteration=d["iteration"], phase=Phase(d["phase"]), weight_version=d["weight_version"],
                   started_at=d["started_at"])  # fmt: skip


def initial_state(iteration: int = 0) -> PhaseState:
    """EXPORT of `iteration`: 0 for a new run, the checkpoint's iteration for a resumed one."""
    return PhaseState(iteration=iteration, phase=FIRST_PHASE, weight_version=iteration)


def next_state(state: PhaseState) -> PhaseState:
    """The successor of `state` in the cycle. ONLOAD -> TRAIN starts the next iteration; TRAIN
    produces the next weight version, so EXPORT of iteration i carries version i."""
    if state.phase is Phase.FAILED:
        raise IllegalTransition("FAILED has no successor; recover explicitly with recover_to(...)")
    i = CYCLE.index(state.phase)
    phase = CYCLE[(i + 1) % len(CYCLE)]
    iteration = state.iteration + 1 if phase is Phase.TRAIN else state.iteration
    version = iteration if phase is Phase.EXPORT else state.weight_version
    return PhaseState(iteration=iteration, phase=phase, weight_version=version)


def order(iteration: int, phase: Phase) -> tuple[int, int]:
    """Sort key of a phase in the run: iteration, then position in the cycle (FAILED sorts last)."""
    return iteration, len(CYCLE) if phase is Phase.FAILED else CYCLE.index(phase)


def check_transition(current: PhaseState, proposed: PhaseState) -> None:
    """Raise IllegalTransition naming both states unless `proposed` may follow `current`."""
    if proposed.phase is Phase.FAILED:
        return
    expected = None if current.phase is Phase.FAILED else next_state(current)
    if expected is None or (proposed.phase, proposed.iteration, proposed.weight_version) != (
        expected.phase,
        expected.iteration,
        expected.weight_version,
    ):
        want = "a recovery" if expected is None else f"{expected.phase.value} (iteration {expected.iteration})"
        raise IllegalTransition(
            f"illegal transition {current.phase.value} (iteration {current.iteration}) -> "
            f"{proposed.phase.value} (iteration {proposed.iteration}); the next phase is {want}"
        )


def fail(state: PhaseState) -> PhaseState:
    return PhaseState(iteration=state.iteration, phase=Phase.FAILED, weight_version=state.weight_version)


def recover_to(state: PhaseState, phase: Phase) -> PhaseState:
    """Leave FAILED for `phase` of the same iteration (the leader decides where to resume)."""
    if state.phase is not Phase.FAILED:
        raise IllegalTransition(f"recover_to is for FAILED, the state is {state.phase.value}")
    if phase is Phase.FAILED:
        raise IllegalTransition("cannot recover to FAILED")
    return PhaseState(iteration=state.iteration, phase=phase, weight_version=state.weight_version)
