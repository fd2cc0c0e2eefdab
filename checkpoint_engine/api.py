"""HTTP API of the checkpoint engine (FastAPI; OpenAPI docs at /docs), bound to loopback by default.

  GET  /health             liveness
  GET  /status             phase, iteration, weight version, vLLM pid and health, last timings
  POST /vllm/start         start vLLM with dummy weights
  POST /vllm/terminate     kill vLLM's whole process tree
  POST /weights/register   a producer on this node wrote a weight region (body: its manifest)
  POST /weights/update     load a version into the running vLLM (local, or pulled from another node)
  POST /phase/complete     the trainer / controller finished its phase of an iteration
  POST /phase/wait         long poll: the first phase at or past (iteration, phase); 504 on timeout
  GET  /acks/{iteration}   every ack of an iteration (payloads and times), by phase and node
Binding to anything but loopback requires a token, then sent as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.acks import ExportAck, parse_ack
from checkpoint_engine.contracts.phases import Phase
from checkpoint_engine.contracts.vllm_client import SidecarError
from checkpoint_engine.contracts.weight_region import Manifest
from checkpoint_engine.coordination_errors import CoordinationTimeout, PhaseFailedError
from checkpoint_engine.daemon import CheckpointEngine
from checkpoint_engine.stall_watch import StallWatch


class RegisterBody(BaseModel):
    manifest: dict[str, Any]
    payload: dict[str, Any]  # contracts.acks.ExportAck: the producer's numbers, the EXPORT ack


class UpdateBody(BaseModel):
    version: int


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


def check_binding(host: str, token: str | None) -> None:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    if not loopback and not token:
        raise ValueError(f"binding the engine API to {host} (not loopback) requires --token")


def create_app(engine: CheckpointEngine, token: str | None = None) -> FastAPI:
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

    def guarded(fn, *args):
        try:
            return fn(*args)
        except (ValueError, LookupError, SidecarError) as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except RuntimeError as e:
            raise HTTPException(status_code=500, detail=str(e)) from e

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "node": engine.cfg.node}

    @app.get("/nodes")
    def nodes() -> dict[str, dict[str, str]]:
        return engine.nodes()

    @app.get("/status")
    def status() -> dict[str, Any]:
        return asdict(engine.status())

    @app.post("/vllm/start")
    def vllm_start() -> dict[str, Any]:
        return guarded(engine.start_vllm).to_dict()

    @app.post("/vllm/restart")
    def vllm_restart(body: RestartBody) -> dict[str, Any]:
        return guarded(engine.restart_vllm, body.version).to_dict()

    @app.post("/vllm/terminate")
    def vllm_terminate() -> dict[str, Any]:
        return guarded(engine.terminate_vllm).to_dict()

    @app.post("/weights/register")
    def weights_register(body: RegisterBody) -> dict[str, Any]:
        manifest = guarded(Manifest.from_dict, body.manifest)
        guarded(engine.register_weights, manifest, guarded(ExportAck.model_validate, body.payload))
        return {"registered": manifest.version}

    @app.post("/weights/update")
    def weights_update(body: UpdateBody) -> dict[str, Any]:
        return guarded(engine.update_weights, body.version).to_dict()

    @app.post("/phase/complete")
    def phase_complete(body: CompleteBody) -> dict[str, Any]:
        guarded(engine.complete_phase, body.iteration, body.phase, guarded(parse_ack, body.phase, body.payload))
        return {"acked": f"{body.phase.value} of iteration {body.iteration}"}

    @app.post("/phase/wait")
    def phase_wait(body: WaitBody) -> dict[str, Any]:
        try:
            return engine.wait_phase(body.iteration, body.phase, body.timeout).to_dict()
        except CoordinationTimeout as e:
            raise HTTPException(status_code=504, detail=str(e)) from e
        except PhaseFailedError as e:
            raise HTTPException(status_code=409, detail=str(e)) from e

    @app.get("/acks/{iteration}")
    def acks(iteration: int) -> dict[str, Any]:
        return engine.iteration_acks(iteration)

    return app


def serve(cfg: EngineConfig) -> None:
    """Run one node's engine (phase loop and API) until SIGINT/SIGTERM."""
    import uvicorn

    check_binding(cfg.host, cfg.token)
    engine = CheckpointEngine(cfg, http_address=f"http://{cfg.host}:{cfg.port}")
    # A stop does not wait out the long polls in flight (a trainer's /phase/wait lasts up to 30 s): after
    # a second they are cancelled and the lifespan's shutdown stops vLLM and removes the regions.
    # A stall of half a lease's time, which risks the lease, is logged with every thread's stack.
    with StallWatch(after=cfg.phase.ttl / 2, period=cfg.phase.ttl / 10):
        uvicorn.run(create_app(engine, cfg.token), host=cfg.host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=1)  # fmt: skip
