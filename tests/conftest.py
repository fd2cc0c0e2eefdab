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


SHM = Path("/dev/shm")
_first_seen: dict[Path, str] = {}  # /dev/shm entry -> the test after which it was first there


def _shm_entries() -> set[Path]:
    return set(SHM.iterdir()) if SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def _note_new_shm_entries(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember after which test each /dev/shm entry appeared, so that a leak names its test."""
    yield
    for entry in _shm_entries() - _first_seen.keys():
        _first_seen[entry] = request.node.nodeid


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole run: no /dev/shm segment and no process that the tests started is left."""
    import psutil

    before = _shm_entries()
    _first_seen.update(dict.fromkeys(before, "(before the tests)"))
    yield
    leaked = sorted(f"{p} (first seen after {_first_seen.get(p, 'the last test')})" for p in _shm_entries() - before)
    # multiprocessing's resource tracker lives as long as the interpreter that started it: not a leak.
    children = [
        f"{p.pid} {' '.join(p.cmdline()[:4])}"
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not leaked, f"tests left shared-memory segments behind: {leaked}"
    assert not children, f"tests left processes behind: {children}"
