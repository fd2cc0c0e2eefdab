"""HTTP client of one node's checkpoint engine, for the processes that own phases (trainer, controller).

They never talk to etcd themselves: they wait for their phase, report it done and register
weights through the engine of their node (see api.py for the endpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests

from checkpoint_engine.contracts.acks import AckPayload, ExportAck, RestartVllmAck, check_ack
from checkpoint_engine.contracts.engine_api import EngineStatus, NodeAddress, PhaseAcks, RefusalKind
from checkpoint_engine.contracts.phases import Phase, PhaseState, successor
from checkpoint_engine.contracts.polling import Deadline, poll_until
from checkpoint_engine.contracts.weight_region import Manifest


class EngineError(RuntimeError):
    """The engine refused a request (HTTP 4xx/5xx); the message carries its explanation."""


class JobFailedError(EngineError):
    """The job's phase is FAILED: the process waiting for its turn should stop."""


class PhaseWaitTimeout(EngineError, TimeoutError):
    """The job did not reach the awaited phase in time."""


# The error each kind of refusal (`engine_api.RefusalKind`) raises here.
_ERRORS: dict[RefusalKind, type[EngineError]] = {"job_failed": JobFailedError, "wait_timeout": PhaseWaitTimeout}


class EngineClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        r = self._session.request(method, self.base_url + path, json=body, timeout=timeout or self.timeout)
        if r.status_code != 200:
            body = r.json() if "json" in r.headers.get("content-type", "") else {}
            detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
            error = _ERRORS.get(body.get("error") if isinstance(body, dict) else None, EngineError)
            raise error(detail if error is JobFailedError else f"{method} {path} -> {r.status_code}: {detail}")
        return r.json()

    def wait_for_engine(self, timeout: float, before_poll: Callable[[], None] | None = None) -> None:
        """Block until the engine answers; `before_poll` runs before each try (a caller checking that the
        engine's process still lives, to fail at once with its cause rather than after `timeout`)."""

        def answers() -> bool | None:
            if before_poll is not None:
                before_poll()
            try:
                self._call("GET", "/health", timeout=2.0)
                return True
            except (requests.ConnectionError, EngineError):
                return None

        if poll_until(answers, timeout, every=0.2) is None:
            raise TimeoutError(f"no checkpoint engine answered at {self.base_url} within {timeout:g} s")

    def wait_phase(
        self,
        iteration: int,
        phase: Phase,
        timeout: float,
        *,
        poll: float = 30.0,
        before_poll: Callable[[], None] | None = None,
    ) -> PhaseState:
        """Block until the job is at or past `phase` of `iteration`, in long polls of at most `poll` s;
        `before_poll` runs before each (a caller checking that its own processes still live)."""
        deadline = Deadline(timeout)
        timeouts: list[PhaseWaitTimeout] = []

        def reached() -> PhaseState | None:
            if before_poll is not None:
                before_poll()
            wait = deadline.left(at_most=poll, at_least=0.1)
            try:
                body = {"iteration": iteration, "phase": phase.value, "timeout": wait}
                return PhaseState.from_dict(self._call("POST", "/phase/wait", body, timeout=wait + 10))
            except PhaseWaitTimeout as e:  # the engine's, naming the phase it saw last
                timeouts.append(e)
                return None

        state = poll_until(reached, timeout, every=0.0)
        if state is None:
            raise timeouts[-1]
        return state

    def wait_done(
        self,
        iteration: int,
        phase: Phase,
        timeout: float,
        *,
        poll: float = 30.0,
        before_poll: Callable[[], None] | None = None,
    ) -> PhaseAcks:
        """Block until `phase` of `iteration` is done (the job is at or past the phase after it); its acks."""
        self.wait_phase(*successor(iteration, phase), timeout, poll=poll, before_poll=before_poll)
        return self.phase_acks(iteration, phase)

    def complete(self, iteration: int, phase: Phase, payload: AckPayload) -> None:
        check_ack(phase, payload)
        body = {"iteration": iteration, "phase": phase.value, "payload": payload.to_dict()}
        self._call("POST", "/phase/complete", body)

    def register_weights(self, manifest: Manifest, payload: ExportAck) -> None:
        self._call("POST", "/weights/register", {"manifest": manifest.to_dict(), "payload": payload.to_dict()})

    def restart_vllm(self, version: int, timeout: float) -> RestartVllmAck:
        """Have the engine start a vLLM that died during ROLLOUT again, with `version` loaded."""
        return RestartVllmAck.model_validate(self._call("POST", "/vllm/restart", {"version": version}, timeout))

    def phase_acks(self, iteration: int, phase: Phase) -> PhaseAcks:
        """Every node's ack of `phase` of `iteration` (payloads and times)."""
        return PhaseAcks.model_validate(self._call("GET", f"/acks/{iteration}/{phase.value}"))

    def nodes(self) -> dict[str, NodeAddress]:
        """The job's live nodes by id, as they registered in etcd."""
        return {n: NodeAddress.model_validate(a) for n, a in self._call("GET", "/nodes").items()}

    def status(self) -> EngineStatus:
        return EngineStatus.model_validate(self._call("GET", "/status"))

    def close(self) -> None:
        self._session.close()
