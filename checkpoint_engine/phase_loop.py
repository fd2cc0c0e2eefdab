"""The loop every node runs to follow the job's phase: do this node's part, and as leader advance.

Consumes: a `Coordinator`, the job's node ids, and from the loop's owner `handler(phase)` (what this
node does in that phase's turn, returning the ack's payload; None where another process of the node
acks the phase itself) and `begin(state)` (work that a phase starts early, `PhaseSpec.begins_at`).
Produces: this node's acks; as leader, the next phase once every node acked, or FAILED naming why.
Waits on: the phase, the acks and the leader seat in etcd, in one-second slices so that `stop()` is
never stuck behind a long barrier.

The node engine runs it with vLLM and the weight store behind its handlers; `timeshare bench nodes`
runs the same loop for hundreds of simulated nodes whose handlers only ack.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from checkpoint_engine.contracts.phases import Owner, Phase, PhaseState, fail, initial_state, next_state, spec
from checkpoint_engine.contracts.polling import Deadline
from checkpoint_engine.coordination_errors import (
    CoordinationError,
    CoordinationTimeout,
    NotLeaderError,
    StaleStateError,
)
from checkpoint_engine.coordinator import Coordinator

log = logging.getLogger(__name__)


class Payload(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


Handler = Callable[[PhaseState], Payload]


class PhaseLoop:
    def __init__(
        self,
        coordinator: Coordinator,
        nodes: Sequence[str],
        *,
        handler: Callable[[Phase], Handler | None],
        begin: Callable[[PhaseState], None] = lambda state: None,
        phase_timeout: float,
        start_iteration: int = 0,
    ) -> None:
        self.coordinator, self.nodes, self.handler, self.begin = coordinator, tuple(nodes), handler, begin
        self.phase_timeout, self.start_iteration = phase_timeout, start_iteration
        self.stopping = threading.Event()
        self.last_error: str | None = None
        self._done: set[tuple[int, Phase]] = set()  # phases whose part this node did (recent ones)

    def ackers(self, phase: Phase) -> tuple[str, ...]:
        """The nodes whose acks complete `phase`: every node, but only the head (the first node, which runs
        the iteration controller) for the controller's phases."""
        return self.nodes[:1] if spec(phase).owner is Owner.CONTROLLER else self.nodes

    def patiently(self, wait: Callable[[float], Any]) -> Any:
        """Run a barrier `wait(timeout)` in one-second slices up to `phase_timeout`; the last slice's
        CoordinationTimeout propagates, and so does the first once the loop is stopping."""
        deadline = Deadline(self.phase_timeout)
        while True:
            try:
                return wait(deadline.left(at_most=1.0, at_least=0.01))
            except CoordinationTimeout:
                if self.stopping.is_set() or deadline.passed():
                    raise

    def step(self, timeout: float, leader: bool | None = None) -> PhaseState:
        """Do this node's part of the current phase once; as leader, wait for every node's ack and
        advance. Waits up to `timeout` for a phase that needs something of this node. `leader`: whether this
        node leads, as the caller just read it (None: read it here)."""
        coordinator = self.coordinator
        leader = coordinator.is_leader() if leader is None else leader

        def needs_me(s: PhaseState) -> bool:
            return (s.iteration, s.phase) not in self._done or (leader and s.phase is not Phase.FAILED)

        state = coordinator.wait_phase(needs_me, timeout, raise_on_failed=False)
        key = (state.iteration, state.phase)
        handler = None if state.phase is Phase.FAILED else self.handler(state.phase)
        if key not in self._done:
            if state.phase is not Phase.FAILED:
                self.begin(state)
            if handler is not None:
                try:
                    coordinator.ack(state, handler(state).to_dict())
                except Exception as e:  # an error ack: the leader fails the phase at once, with the cause
                    self.last_error = f"{state.phase.value} of iteration {state.iteration}: {e}"
                    coordinator.log.exception("%s", self.last_error)
                    coordinator.ack(state, error=f"{type(e).__name__}: {_first_line(e)}")
            self._done = {k for k in self._done if k[0] >= state.iteration - 1} | {key}
        if leader and state.phase is not Phase.FAILED:
            self._lead(state)
        return state

    def _lead(self, state: PhaseState) -> None:
        """Every node's ack, then the next phase; FAILED with the reason when a node cannot give it."""
        coordinator = self.coordinator
        try:
            self.patiently(lambda t: coordinator.wait_acks(state, self.ackers(state.phase), t))
            self._advance(state, next_state(state))
        except StaleStateError as e:  # another leader (a failover) moved the phase on meanwhile: follow it
            coordinator.log.warning("%s; following the phase as it is", e)
        except CoordinationError as e:  # a lost or failed node
            if self.stopping.is_set():
                return
            self.last_error = str(e)
            self._advance(state, fail(state))

    def _advance(self, state: PhaseState, new: PhaseState) -> None:
        try:
            self.coordinator.advance(state, new)
        except NotLeaderError as e:  # its lease ran out meanwhile: a successor leads, this node follows it
            self.coordinator.log.warning("%s; following the new leader", e)
        except StaleStateError as e:  # writing FAILED to a phase already left: nothing to fail
            if new.phase is not Phase.FAILED:
                raise
            self.coordinator.log.warning("%s; following the phase as it is", e)

    def run(self) -> None:
        """Follow the phase until `stop()`; campaign for leadership whenever the seat is free."""
        while not self.stopping.is_set():
            holder, leads = self.coordinator.seat()  # one read of the seat per step: hundreds of nodes read it
            try:
                leads = self._lead_vacant_seat() if holder is None else leads
            except CoordinationTimeout:
                if self.stopping.is_set():
                    return  # the start-up barrier gave up because the job is stopping
                raise
            try:
                self.step(timeout=1.0, leader=leads)
            except CoordinationTimeout:
                continue  # nothing to do within a second: look at the leader seat again

    def _lead_vacant_seat(self) -> bool:
        """Campaign for the vacant seat; once won, the start-up barrier and the first phase. Whether it won."""
        coordinator = self.coordinator
        if not coordinator.campaign():
            return False
        # Start-up barrier: a node that never registered would fail the first phase at once.
        self.patiently(lambda t: coordinator.wait_nodes(self.nodes, t))
        try:
            coordinator.init_phase(initial_state(self.start_iteration))
        except NotLeaderError as e:  # its lease ran out during the barrier: a successor leads, follow it
            coordinator.log.warning("%s; following the new leader", e)
            return False
        return True

    def stop(self) -> None:
        """Make `run` return within about a second (the caller joins its thread)."""
        self.stopping.set()


def _first_line(error: BaseException) -> str:
    """An exception's first line (without the colon before a log's tail): error acks carry the cause,
    the engine's log the rest."""
    return (str(error).splitlines() or [""])[0].rstrip(":")
