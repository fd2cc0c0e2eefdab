"""The phase loop's decisions with a fake coordinator: what it acks, when the leader advances or fails the
phase, and that a leader deposed mid-barrier goes on following instead of dying."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from checkpoint_engine.contracts.phases import Phase, PhaseState, initial_state, next_state
from checkpoint_engine.coordination_errors import NodeLostError, NotLeaderError, StaleStateError
from checkpoint_engine.phase_loop import PhaseLoop

NODES = ("node0", "node1")


@dataclass
class _Payload:
    def to_dict(self) -> dict[str, Any]:
        return {"done": True}


@dataclass
class FakeCoordinator:
    state: PhaseState
    leader: bool = True
    barrier_error: Exception | None = None
    advance_errors: list[Exception] = field(default_factory=list)
    acks: list[tuple[Phase, dict | None, str]] = field(default_factory=list)
    advances: list[PhaseState] = field(default_factory=list)
    log: logging.LoggerAdapter = field(default_factory=lambda: logging.LoggerAdapter(logging.getLogger("fake"), {}))

    def is_leader(self) -> bool:
        return self.leader

    def wait_phase(self, until: Any, timeout: float, *, raise_on_failed: bool = True) -> PhaseState:
        assert until(self.state)
        return self.state

    def ack(self, state: PhaseState, payload: dict | None = None, error: str = "") -> None:
        self.acks.append((state.phase, payload, error))

    def wait_acks(self, state: PhaseState, nodes: Any, timeout: float) -> dict:
        if self.barrier_error is not None:
            raise self.barrier_error
        return {}

    def advance(self, expected: PhaseState, new: PhaseState) -> int:
        if self.advance_errors:
            raise self.advance_errors.pop(0)
        self.advances.append(new)
        return 1


def _loop(coordinator: FakeCoordinator, handler: Any = None) -> PhaseLoop:
    handle = handler or (lambda state: _Payload())
    return PhaseLoop(coordinator, NODES, handler=lambda phase: handle, phase_timeout=5.0)  # type: ignore[arg-type]


def test_a_leader_acks_its_part_and_advances_once_every_node_acked() -> None:
    coordinator = FakeCoordinator(initial_state())
    _loop(coordinator).step(timeout=1.0)
    assert coordinator.acks == [(Phase.EXPORT, {"done": True}, "")]
    assert [(s.iteration, s.phase) for s in coordinator.advances] == [(0, next_state(initial_state()).phase)]


def test_a_handler_that_raises_sends_an_error_ack_naming_the_cause() -> None:
    def broken(state: PhaseState) -> _Payload:
        raise RuntimeError("vLLM did not start\ndetails in its log")

    coordinator = FakeCoordinator(initial_state(), leader=False)
    loop = _loop(coordinator, broken)
    loop.step(timeout=1.0)
    assert coordinator.acks == [(Phase.EXPORT, None, "RuntimeError: vLLM did not start")]
    assert loop.last_error is not None
    assert "vLLM did not start" in loop.last_error


def test_a_lost_node_fails_the_phase_with_the_reason() -> None:
    coordinator = FakeCoordinator(initial_state(), barrier_error=NodeLostError("node1 has no live lease"))
    loop = _loop(coordinator)
    loop.step(timeout=1.0)
    assert [s.phase for s in coordinator.advances] == [Phase.FAILED]
    assert loop.last_error == "node1 has no live lease"


@pytest.mark.parametrize("when", ["advance", "fail"])
def test_a_leader_deposed_mid_barrier_goes_on_following(when: str) -> None:
    """Its lease ran out while it waited: its advance (or its FAILED write) is fenced off, and the loop carries
    on as a follower of the successor rather than dying with the error."""
    deposed = NotLeaderError("node0 lost the leadership (its lease expired); now node1 leads")
    state = initial_state()
    coordinator = FakeCoordinator(state, advance_errors=[deposed])
    if when == "fail":
        coordinator.barrier_error = NodeLostError("node1 has no live lease")
    loop = _loop(coordinator)
    assert loop.step(timeout=1.0) is state
    assert coordinator.advances == []


def test_each_step_reads_the_leader_seat_once() -> None:
    """With hundreds of nodes every read counts: the loop reads the seat once per step, and the step takes the
    leadership it read instead of asking etcd again."""

    @dataclass
    class Counting(FakeCoordinator):
        seats: int = 0
        leader_reads: int = 0
        loop: PhaseLoop | None = None

        def seat(self) -> tuple[str | None, bool]:
            self.seats += 1
            if self.seats == 3 and self.loop is not None:
                self.loop.stop()
            return "node0", self.leader

        def is_leader(self) -> bool:
            self.leader_reads += 1
            return self.leader

        def advance(self, expected: PhaseState, new: PhaseState) -> int:
            self.state = new
            return super().advance(expected, new)

    coordinator = Counting(initial_state())
    coordinator.loop = _loop(coordinator)
    coordinator.loop.run()
    assert (coordinator.seats, coordinator.leader_reads) == (3, 0)
    assert len(coordinator.advances) == 3  # one step per read, each advancing as the leader


@pytest.mark.parametrize("when", ["advance", "fail"])
def test_a_leader_whose_phase_moved_on_meanwhile_follows_it(when: str) -> None:
    """Another leader (after a failover) advanced the phase while this one waited: the lost compare-and-swap
    neither kills the loop nor fails a phase the job has already left."""
    stale = StaleStateError(1, 2, None)
    coordinator = FakeCoordinator(initial_state(), advance_errors=[stale, stale])
    if when == "fail":
        coordinator.barrier_error = NodeLostError("node1 has no live lease")
    loop = _loop(coordinator)
    loop.step(timeout=1.0)
    assert coordinator.advances == []


def test_a_node_deposed_between_winning_the_seat_and_writing_the_first_phase_follows() -> None:
    """Elected in a failover, its lease ran out while it waited for every node to register: the fenced first
    write is refused and the loop goes on following the successor. (It used to die there, leaving a live node
    that never acked again and the job waiting out its phase timeout.)"""

    @dataclass
    class DeposedAtOnce(FakeCoordinator):
        seats: int = 0
        loop: PhaseLoop | None = None

        def seat(self) -> tuple[str | None, bool]:
            self.seats += 1
            if self.loop is not None:
                self.loop.stop()  # this step is the last
            return None, False

        def campaign(self) -> bool:
            return True

        def wait_nodes(self, nodes: Any, timeout: float) -> dict:
            return {}

        def init_phase(self, state: PhaseState) -> None:
            raise NotLeaderError("node0 may not write the phase: it is not the leader (node1 is)")

    coordinator = DeposedAtOnce(next_state(initial_state()), leader=False)
    coordinator.loop = _loop(coordinator)
    coordinator.loop.run()  # returns (stopped) instead of raising
    assert coordinator.seats == 1
    assert coordinator.acks == [(coordinator.state.phase, {"done": True}, "")]  # its part done, as a follower
    assert coordinator.advances == []
