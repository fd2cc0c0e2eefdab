"""What the checkpoint engine's HTTP API answers, and the errors it may answer with.

Shared by the API (`checkpoint_engine/api.py`) and its client (`engine_client.py`): every answer is
one of these messages, and every refusal names its kind, so the client raises the matching error
class without knowing which endpoint it called.
"""

from __future__ import annotations

from typing import Any, Literal

from checkpoint_engine.contracts.acks import AckPayload, parse_ack
from checkpoint_engine.contracts.message import Message
from checkpoint_engine.contracts.phases import Phase


class NodeAck(Message):
    """One node's ack of one phase: its payload (`contracts.acks`) and when it was given."""

    node: str
    payload: dict[str, Any]
    acked_at: float
    error: str = ""  # the node could not do its part


class PhaseAcks(Message):
    """Every node's ack of `phase` of `iteration` (GET /acks/{iteration}/{phase})."""

    iteration: int
    phase: Phase
    acks: dict[str, NodeAck]  # by node

    def payloads(self) -> dict[str, AckPayload]:
        """The typed payloads of the acks that carry one (an error ack carries none), by node, sorted."""
        return {n: parse_ack(self.phase, a.payload) for n, a in sorted(self.acks.items()) if not a.error}


class NodeAddress(Message):
    """Where a live node's engine and vLLM answer (GET /nodes), as it registered them in etcd."""

    engine: str
    vllm: str


class EngineStatus(Message):
    """GET /status: what one node's engine knows of the job and of its own vLLM."""

    node: str
    leader: str | None
    alive_nodes: list[str]
    phase: dict[str, Any] | None  # `PhaseState.to_dict()`
    vllm_pid: int | None
    vllm_alive: bool  # a sidecar forked by START_VLLM lives
    vllm_zygote: bool  # the zygote lives: the next START_VLLM forks a sidecar with its imports done
    vllm_weight_version: int | None
    vllm_restarts: int  # vLLMs started again after dying during ROLLOUT (POST /vllm/restart)
    weight_versions: list[int]
    last_timings: dict[str, float]
    last_error: str | None = None


# The kinds of refusal, in the body of every 4xx/5xx answer next to `detail`.
RefusalKind = Literal["not_now", "bad_request", "job_failed", "wait_timeout", "internal"]


class EngineRefusal(Exception):
    """A request the engine cannot serve, for a reason the caller can act on; the API answers `status`."""

    kind: RefusalKind = "not_now"
    status: int = 409


class NotNow(EngineRefusal):
    """The job is not where the request needs it (e.g. a phase completed out of turn)."""


class BadRequest(EngineRefusal):
    """The request's body is not what the endpoint takes (an unknown payload, a malformed manifest)."""

    kind: RefusalKind = "bad_request"
    status: int = 422
