"""The phase machine of one iteration, as plain data and pure functions (no etcd, no processes).

`TABLE` is the one place that says, for each phase in order, who completes it and which weight
version it carries; the checkpoint engine, the trainer ranks, the controller and the metrics read
it. Iteration 0 starts at EXPORT of the initial checkpoint. A phase may begin its work before its
turn (`PhaseSpec.begins_at`: vLLM starts with dummy weights while EXPORT runs); the machine itself
records the order in which the phases complete. Any phase may go to FAILED, which has no successor:
the job stops there.
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


class Owner(enum.StrEnum):
    """Who does a phase's work on each node and reports it done."""

    TRAINER = "trainer"  # the node's trainer ranks; rank 0 reports through the node's engine
    ENGINE = "engine"  # the checkpoint engine itself
    CONTROLLER = "controller"  # the iteration controller


class Version(enum.StrEnum):
    """Which weight version a phase's `PhaseState.weight_version` names."""

    SERVED = "served"  # the version vLLM serves (or last served): TRAIN learns from its rollout
    EXPORTED = "exported"  # the version TRAIN just produced, which EXPORT writes and vLLM then loads


@dataclass(frozen=True)
class PhaseSpec:
    phase: Phase
    owner: Owner
    version: Version
    work: str
    # The phase during which this one's work already begins (its owner starts it there and finishes it
    # in its own turn); None: it begins in its turn.
    begins_at: Phase | None = None


TABLE: tuple[PhaseSpec, ...] = (
    PhaseSpec(Phase.TRAIN, Owner.TRAINER, Version.SERVED, "optimizer steps on the batch of the last rollout"),
    PhaseSpec(Phase.OFFLOAD, Owner.TRAINER, Version.SERVED, "parameters and optimizer state leave the accelerator"),
    # Completed by registering the version's weight region with the node's engine; a node without a
    # trainer (EngineConfig.weights_from) has its engine ack once the producing nodes registered.
    PhaseSpec(Phase.EXPORT, Owner.TRAINER, Version.EXPORTED, "HF-named tensors into the node's weight region"),
    # vLLM needs no weights to start (dummy load), and the trainer has offloaded by EXPORT.
    PhaseSpec(Phase.START_VLLM, Owner.ENGINE, Version.EXPORTED, "vLLM started with dummy weights", Phase.EXPORT),
    PhaseSpec(Phase.UPDATE_WEIGHTS, Owner.ENGINE, Version.EXPORTED, "vLLM loads the verified version"),
    PhaseSpec(Phase.ROLLOUT, Owner.CONTROLLER, Version.EXPORTED, "generation, scoring, the next batch"),
    PhaseSpec(Phase.TERMINATE_VLLM, Owner.ENGINE, Version.EXPORTED, "vLLM's process tree killed, memory back"),
    PhaseSpec(Phase.ONLOAD, Owner.TRAINER, Version.EXPORTED, "training state back on the accelerator"),
)
CYCLE: tuple[Phase, ...] = tuple(s.phase for s in TABLE)
FIRST_PHASE = Phase.EXPORT  # iteration 0 exports the initial checkpoint
_SPECS = {s.phase: s for s in TABLE}


def spec(phase: Phase) -> PhaseSpec:
    if phase not in _SPECS:
        raise ValueError(f"{phase.value} is not a phase of the cycle {[p.value for p in CYCLE]}")
    return _SPECS[phase]


def owned_by(owner: Owner, *, starting: Phase = CYCLE[0]) -> tuple[Phase, ...]:
    """`owner`'s phases in cycle order, from `starting` on (the run's first iteration: FIRST_PHASE)."""
    return tuple(s.phase for s in TABLE[CYCLE.index(starting) :] if s.owner is owner)


def begun_at(phase: Phase) -> tuple[Phase, ...]:
    """The phases whose work begins when `phase` does (see `PhaseSpec.begins_at`)."""
    return tuple(s.phase for s in TABLE if s.begins_at is phase)


def successor(iteration: int, phase: Phase) -> tuple[int, Phase]:
    """The phase after `phase` of `iteration`: the point at which `phase` is done."""
    i = CYCLE.index(spec(phase).phase)
    following = CYCLE[(i + 1) % len(CYCLE)]
    return (iteration + 1 if following is Phase.TRAIN else iteration), following


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
        return cls(
            iteration=d["iteration"],
            phase=Phase(d["phase"]),
            weight_version=d["weight_version"],
            started_at=d["started_at"],
        )


def initial_state(iteration: int = 0) -> PhaseState:
    """EXPORT of `iteration`: 0 for a new run, the checkpoint's iteration for a resumed one."""
    return PhaseState(iteration=iteration, phase=FIRST_PHASE, weight_version=iteration)


def next_state(state: PhaseState) -> PhaseState:
    """The successor of `state` in the cycle. ONLOAD -> TRAIN starts the next iteration; TRAIN
    produces the next weight version, so EXPORT of iteration i carries version i."""
    if state.phase is Phase.FAILED:
        raise IllegalTransition("FAILED has no successor")
    iteration, phase = successor(state.iteration, state.phase)
    version = iteration if spec(phase).version is Version.EXPORTED else state.weight_version
    return PhaseState(iteration=iteration, phase=phase, weight_version=version)


def order(iteration: int, phase: Phase) -> tuple[int, int]:
    """Sort key of a phase in the run: iteration, then position in the cycle (FAILED sorts last)."""
    return iteration, len(CYCLE) if phase is Phase.FAILED else CYCLE.index(phase)


def next_turn(state: PhaseState, owner: Owner) -> tuple[int, Phase]:
    """The first phase of `owner`'s at or after `state`: where a process of `owner`'s started again takes up
    its part (no phase of `owner`'s passes without its ack, so the job cannot move past it meanwhile)."""
    if state.phase is Phase.FAILED:
        raise IllegalTransition(f"the job FAILED in iteration {state.iteration}: nothing to take up")
    iteration, phase = state.iteration, state.phase
    while spec(phase).owner is not owner:
        iteration, phase = successor(iteration, phase)
    return iteration, phase


def trained_through(iteration: int, phase: Phase) -> int:
    """The iteration whose TRAIN the trainer's state has finished when `phase` of `iteration` begins: the
    checkpoint a trainer started again there loads (TRAIN i learns on top of TRAIN i - 1's result)."""
    return iteration - 1 if phase is Phase.TRAIN else iteration


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
