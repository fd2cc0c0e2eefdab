"""Fixtures shared by all tests. Each starts what it yields and stops it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from checkpoint_engine.etcd_client import connect
from launch.etcd_server import LocalEtcd

if TYPE_CHECKING:
    import pyetcd


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[LocalEtcd]:
    """A real etcd on loopback for one test, with its data and log under the test's tmp_path."""
    with LocalEtcd(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def etcd_client(etcd_server: LocalEtcd) -> Iterator[pyetcd.MultiEndpointEtcd3Client]:
    """A client of `etcd_server`, closed (with its watch thread) before the server stops."""
    with connect(etcd_server.endpoint) as client:
        yield client


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole run: no /dev/shm segment and no process that the tests started is left."""
    import psutil

    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    yield
    leaked = sorted(str(p) for p in (set(shm.iterdir()) if shm.is_dir() else set()) - before)
    # multiprocessing's resource tracker lives as long as the interpreter that started it: not a leak.
    children = [
        f"{p.pid} {' '.join(p.cmdline()[:4])}"
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not leaked, f"tests left shared-memory segments behind: {leaked}"
    assert not children, f"tests left processes behind: {children}"
