"""HTTP API of the checkpoint engine (FastAPI; OpenAPI docs at /docs), bound to loopback by default.

The phase machine drives vLLM; the API only lets the node's other processes take their turns in it:
  GET  /health                      liveness
  GET  /status                      phase, leader, vLLM pid and health, loaded version, last timings
  GET  /nodes                       the job's live nodes: their engine's and vLLM's addresses
  POST /weights/register            a producer on this node wrote a weight region (EXPORT's ack)
  POST /phase/complete              the trainer / controller finished its phase of an iteration
  POST /phase/wait                  long poll: the first phase at or past (iteration, phase)
  GET  /acks/{iteration}/{phase}    every node's ack of one phase (payloads and times)
  POST /vllm/restart                during ROLLOUT only: a vLLM that died starts again with its version
Binding to anything but loopback requires a token, then sent as `Authorization: Bearer <token>`.
A refusal answers `{"detail": ..., "error": <engine_api.RefusalKind>}`: the project's own errors with
their 4xx (504 for a wait that ran out), anything else 500 with its traceback in the engine's log.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.acks import AckPayload, ExportAck, parse_ack
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.engine_api import (
    BadRequest,
    EngineRefusal,
    EngineStatus,
    NodeAddress,
    PhaseAcks,
    RefusalKind,
)
from checkpoint_engine.contracts.phases import Phase
from checkpoint_engine.contracts.weight_region import Manifest
from checkpoint_engine.coordination_errors import CoordinationTimeout, PhaseFailedError
from checkpoint_engine.node_engine import NodeEngine
from checkpoint_engine.stall_watch import StallWatch

log = logging.getLogger(__name__)


class RegisterBody(BaseModel):
    manifest: dict[str, Any]
    payload: dict[str, Any]  # contracts.acks.ExportAck: the producer's numbers, the EXPORT ack


class RestartBody(BaseModel):
    version: int  # the version the ROLLOUT in progress serves


class WaitBody(BaseModel):
    iteration: int
    phase: Phase
    timeout: float = Field(default=30.0, gt=0, le=300)


class CompleteBody(BaseModel):
    iteration: int
    phase: Phase
    payload: dict[str, Any]  # the phase's contracts.acks payload


def _refused(status: int, kind: RefusalKind, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "error": kind})


def _payload(phase: Phase, payload: dict[str, Any]) -> AckPayload:
    try:
        return parse_ack(phase, payload)
    except ValueError as e:
        raise BadRequest(str(e)) from e


def check_binding(host: str, token: str | None) -> None:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    if not loopback and not token:
        raise ConfigError(f"engine.host={host} is not loopback: binding the engine API there requires engine.token")


def create_app(engine: NodeEngine, token: str | None = None) -> FastAPI:
    """The API over `engine`; the app's lifespan runs the engine's phase loop and stops the engine
    (vLLM, weight regions, lease) on shutdown. uvicorn re-raises SIGTERM after its graceful
    shutdown, so cleanup must happen inside the lifespan, not after `uvicorn.run` returns."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    def authorised(request: Request) -> None:
        if token and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    app = FastAPI(
        title=f"timeshare checkpoint engine ({engine.cfg.node})", dependencies=[Depends(authorised)], lifespan=lifespan
    )

    @app.exception_handler(EngineRefusal)
    def refusal(_: Request, e: EngineRefusal) -> JSONResponse:
        return _refused(e.status, e.kind, str(e))

    @app.exception_handler(PhaseFailedError)
    def job_failed(_: Request, e: PhaseFailedError) -> JSONResponse:
        return _refused(409, "job_failed", str(e))

    @app.exception_handler(CoordinationTimeout)
    def wait_timeout(_: Request, e: CoordinationTimeout) -> JSONResponse:
        return _refused(504, "wait_timeout", str(e))

    @app.exception_handler(Exception)
    def internal(_: Request, e: Exception) -> JSONResponse:  # a bug, or a dependency that failed: not the caller's
        log.error("request failed", exc_info=e)
        return _refused(500, "internal", f"{type(e).__name__}: {e}")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "node": engine.cfg.node}

    @app.get("/nodes")
    def nodes() -> dict[str, NodeAddress]:
        return engine.nodes()

    @app.get("/status")
    def status() -> EngineStatus:
        return engine.status()

    @app.post("/vllm/restart")
    def vllm_restart(body: RestartBody) -> dict[str, Any]:
        return engine.restart_vllm(body.version).to_dict()

    @app.post("/weights/register")
    def weights_register(body: RegisterBody) -> dict[str, Any]:
        try:
            manifest, payload = Manifest.from_dict(body.manifest), ExportAck.model_validate(body.payload)
        except (ValidationError, ValueError, KeyError) as e:
            raise BadRequest(f"not a weight region's registration: {e}") from e
        engine.register_weights(manifest, payload)
        return {"registered": manifest.version}

    @app.post("/phase/complete")
    def phase_complete(body: CompleteBody) -> dict[str, Any]:
        engine.complete_phase(body.iteration, body.phase, _payload(body.phase, body.payload))
        return {"acked": f"{body.phase.value} of iteration {body.iteration}"}

    @app.post("/phase/wait")
    def phase_wait(body: WaitBody) -> dict[str, Any]:
        return engine.wait_phase(body.iteration, body.phase, body.timeout).to_dict()

    @app.get("/acks/{iteration}/{phase}")
    def acks(iteration: int, phase: Phase) -> PhaseAcks:
        return engine.phase_acks(iteration, phase)

    return app


def serve(cfg: EngineConfig) -> None:
    """Run one node's engine (phase loop and API) until SIGINT/SIGTERM."""
    import uvicorn

    check_binding(cfg.host, cfg.token)
    engine = NodeEngine(cfg, http_address=f"http://{cfg.host}:{cfg.port}")
    # A stop does not wait out the long polls in flight (a trainer's /phase/wait lasts up to 30 s): after
    # a second they are cancelled and the lifespan's shutdown stops vLLM and removes the regions.
    # A stall of half a lease's time, which risks the lease, is logged with every thread's stack.
    with StallWatch(after=cfg.phase.ttl / 2, period=cfg.phase.ttl / 10):
        app = create_app(engine, cfg.token)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=1)
