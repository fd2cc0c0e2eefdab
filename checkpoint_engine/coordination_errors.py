"""What the etcd coordination raises, apart from pyetcd's own errors (etcd out of reach).

Consumes: phase states, only to name them in messages. Produces: the error types that the
coordinator raises and that its callers (the node engine, the HTTP API) catch; no etcd, no client.
"""

from __future__ import annotations

from checkpoint_engine.contracts.phases import PhaseState
from checkpoint_engine.etcd_keys import describe


class CoordinationError(RuntimeError):
    """A coordination step that cannot go on (as opposed to a timeout)."""


class CoordinationTimeout(CoordinationError, TimeoutError):
    """A wait ran out; the message names what did not arrive (nodes, iteration, phase, version)."""


class StaleStateError(CoordinationError):
    """A compare-and-swap on the phase lost: someone else wrote it since the caller read it."""

    def __init__(self, expected: int | PhaseState, found_revision: int, found: PhaseState | None) -> None:
        self.expected, self.found_revision, self.found = expected, found_revision, found
        self.expected_revision = expected if isinstance(expected, int) else None
        wanted = f"revision {expected}" if isinstance(expected, int) else describe(expected)
        super().__init__(
            f"phase compare-and-swap lost: expected {wanted}, found revision {found_revision} holding {describe(found)}"
        )


class NotLeaderError(CoordinationError):
    """A phase write from a node that does not (or no longer) hold the leader key."""


class NodeLostError(CoordinationError):
    """A node awaited by a barrier lost its lease (crashed, hung or cut off) before answering."""


class NodeFailedError(CoordinationError):
    """A node awaited by a barrier reported that it could not do its part of the phase (an error ack)."""


class PhaseFailedError(CoordinationError):
    """The leader declared the phase FAILED while this node waited for something else."""

    def __init__(self, state: PhaseState, waited_for: str, causes: list[str] | None = None) -> None:
        self.state = state
        because = f": {'; '.join(causes)}" if causes else ""
        super().__init__(f"the job is {describe(state)} (while waiting for {waited_for}){because}")
