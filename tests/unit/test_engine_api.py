"""The engine API's access rules, without an engine behind it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from checkpoint_engine.api import check_binding, create_app


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_binding("127.0.0.1", None)
    check_binding("localhost", None)
    check_binding("0.0.0.0", "s3cret")
    with pytest.raises(ValueError, match=r"0\.0\.0\.0.*requires --token"):
        check_binding("0.0.0.0", None)


def test_token_is_required_on_every_endpoint() -> None:
    engine = SimpleNamespace(cfg=SimpleNamespace(node="node7"))
    client = TestClient(create_app(engine, token="s3cret"))  # no `with`: the lifespan (phase loop) stays off
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/health", headers={"Authorization": "Bearer s3cret"})
    assert ok.json() == {"status": "ok", "node": "node7"}
    assert client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
