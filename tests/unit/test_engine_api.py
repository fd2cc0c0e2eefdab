"""The engine API's access rules, without an engine behind it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from checkpoint_engine.api import check_binding, create_app
from checkpoint_engine.contracts.acks import MetricsAck
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.engine_api import NotNow
from checkpoint_engine.contracts.engine_client import EngineClient, EngineError, JobFailedError, PhaseWaitTimeout
from checkpoint_engine.contracts.phases import Phase, PhaseState
from checkpoint_engine.coordination_errors import CoordinationTimeout, PhaseFailedError


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_binding("127.0.0.1", None)
    check_binding("localhost", None)
    check_binding("0.0.0.0", "s3cret")
    with pytest.raises(ConfigError, match=r"engine.host=0\.0\.0\.0 is not loopback.*requires engine.token"):
        check_binding("0.0.0.0", None)


def test_token_is_required_on_every_endpoint() -> None:
    engine = SimpleNamespace(cfg=SimpleNamespace(node="node7"))
    client = TestClient(create_app(engine, token="s3cret"))  # no `with`: the lifespan (phase loop) stays off
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/health", headers={"Authorization": "Bearer s3cret"})
    assert ok.json() == {"status": "ok", "node": "node7"}
    assert client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200


class RefusingEngine:
    """Refuses each request the way a real engine can: out of turn, job failed, wait ran out, a bug."""

    cfg = SimpleNamespace(node="node7")

    def complete_phase(self, iteration: int, phase: Phase, payload: object) -> None:
        raise NotNow(f"cannot complete {phase.value} of iteration {iteration}: the job is elsewhere")

    def wait_phase(self, iteration: int, phase: Phase, timeout: float) -> PhaseState:
        if iteration == 1:
            raise PhaseFailedError(PhaseState(iteration=1, phase=Phase.FAILED, weight_version=1), "TRAIN")
        raise CoordinationTimeout("nothing within 0.1 s")

    def restart_vllm(self, version: int) -> None:
        raise KeyError("a bug, not the caller's mistake")


def _client_of(app: object) -> EngineClient:
    client = EngineClient("http://testserver")
    client._session = TestClient(app, raise_server_exceptions=False)  # the API in this process
    return client


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument with the TestClient")
def test_refusals_name_their_kind_and_the_client_raises_its_class() -> None:
    client = _client_of(create_app(RefusingEngine()))
    with pytest.raises(EngineError, match="409: cannot complete TRAIN of iteration 3") as refused:
        client.complete(3, Phase.TRAIN, MetricsAck())
    assert type(refused.value) is EngineError
    with pytest.raises(JobFailedError, match=r"the job is FAILED \(iteration 1"):
        client.wait_phase(1, Phase.TRAIN, timeout=0.1)
    with pytest.raises(PhaseWaitTimeout, match="504"):
        client.wait_phase(2, Phase.TRAIN, timeout=0.1)
    with pytest.raises(EngineError, match="500: KeyError") as failed:  # a bug is no refusal of the caller's
        client.restart_vllm(0, timeout=1)
    assert type(failed.value) is EngineError
    bad = client._session.post("/phase/complete", json={"iteration": 0, "phase": "TRAIN", "payload": {"x": 1}})
    assert (bad.status_code, bad.json()["error"]) == (422, "bad_request")
