"""The coordination primitives the phase machine relies on, checked against a real etcd 3.4 through
pyetcd: key round trip, lease expiry and keep-alive, compare-and-swap on a revision, watches, and
the lifecycle of the local server (start, failure reports, nothing left running)."""

from __future__ import annotations

import os
import queue
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest
from pyetcd.events import PutEvent
from pyetcd.exceptions import ConnectionFailedError
from pyetcd.watch import WatchResponse

from checkpoint_engine.etcd_client import connect, parse_endpoint
from launch import etcd_server
from launch.etcd_server import EtcdWatchdog, LocalEtcd, free_loopback_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PREFIX = "/timeshare/test-job/"
TTL = 2  # etcd 3.4 with default raft timing grants at least 2 s whatever is asked for


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_put_get_round_trip(etcd_client) -> None:
    assert etcd_client.get(PREFIX + "missing") == (None, None)
    etcd_client.put(PREFIX + "phase", b'{"iteration": 3, "phase": "TRAIN"}')
    etcd_client.put(PREFIX + "nodes/node1", "up")
    value, meta = etcd_client.get(PREFIX + "phase")
    assert value == b'{"iteration": 3, "phase": "TRAIN"}'
    assert meta.key == (PREFIX + "phase").encode()
    assert meta.version == 1
    assert [m.key for _, m in etcd_client.get_prefix(PREFIX + "nodes/")] == [(PREFIX + "nodes/node1").encode()]


def test_lease_key_expires_without_refresh_and_stays_while_refreshed(etcd_client) -> None:
    expiring, kept = etcd_client.lease(TTL), etcd_client.lease(TTL)
    assert expiring.ttl == TTL
    etcd_client.put(PREFIX + "nodes/dead", "up", lease=expiring)
    etcd_client.put(PREFIX + "nodes/alive", "up", lease=kept)
    start = time.monotonic()
    while etcd_client.get(PREFIX + "nodes/dead")[0] is not None:
        assert time.monotonic() - start < TTL + 3, "a key outlived its lease by 3 s"
        assert kept.refresh()[0].TTL == TTL
        time.sleep(0.2)
    waited = time.monotonic() - start
    assert waited > TTL - 0.5, f"the key vanished after {waited:.2f} s, before its {TTL} s lease ran out"
    # The refreshed lease was granted the same TTL and has now lived past it.
    assert etcd_client.get(PREFIX + "nodes/alive")[0] == b"up"
    kept.revoke()
    assert etcd_client.get(PREFIX + "nodes/alive") == (None, None)


def test_compare_and_swap_on_mod_revision(etcd_client) -> None:
    key, txn = PREFIX + "phase", etcd_client.transactions
    etcd_client.put(key, "TRAIN")
    revision = etcd_client.get(key)[1].mod_revision

    swapped, _ = etcd_client.transaction(
        compare=[txn.mod(key) == revision], success=[txn.put(key, "OFFLOAD")], failure=[]
    )
    assert swapped
    stale, responses = etcd_client.transaction(
        compare=[txn.mod(key) == revision], success=[txn.put(key, "EXPORT")], failure=[txn.get(key)]
    )
    assert not stale
    (current,) = responses[0]
    assert current[0] == b"OFFLOAD"
    value, meta = etcd_client.get(key)
    assert value == b"OFFLOAD"
    assert meta.mod_revision > revision


def test_watch_sees_a_put_made_after_it_started(etcd_client) -> None:
    key = PREFIX + "phase"
    etcd_client.put(key, "before")
    responses: queue.Queue = queue.Queue()
    # add_watch_callback returns once etcd has confirmed the watch, so the next put must be seen.
    watch_id = etcd_client.add_watch_callback(key, responses.put)
    try:
        etcd_client.put(key, "after")
        response = responses.get(timeout=5)
    finally:
        etcd_client.cancel_watch(watch_id)
    assert isinstance(response, WatchResponse), f"the watch failed: {response!r}"
    (event,) = response.events
    assert isinstance(event, PutEvent)
    assert (event.key, event.value) == (key.encode(), b"after")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [("127.0.0.1:2379", ("127.0.0.1", 2379)), ("etcd-0.cluster:12379", ("etcd-0.cluster", 12379))],
)
def test_parse_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1", ":2379", "127.0.0.1:", "127.0.0.1:port", "127.0.0.1:0", "127.0.0.1:70000", "http://h:1"]
)
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT") as info:
        parse_endpoint(endpoint)
    assert repr(endpoint) in str(info.value)


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """Ports an outgoing connection cannot take as its local end before the server binds them."""
    low, _ = etcd_server._ephemeral_range()
    ports = free_loopback_ports(5)
    assert len(set(ports)) == 5
    assert all(etcd_server.PORTS_FROM <= p < low for p in ports)


def test_client_retries_an_endpoint_that_failed() -> None:
    # pyetcd's default client answers the second call with "Trying to use a failed node" for 300 s.
    (closed_port,) = free_loopback_ports(1)
    with connect(f"127.0.0.1:{closed_port}", timeout=1) as client:
        for _ in range(2):
            with pytest.raises(ConnectionFailedError):
                client.get("/")


def test_server_process_is_gone_after_the_block(tmp_path: Path) -> None:
    with LocalEtcd(tmp_path) as server:
        pid = server.pid
        assert pid is not None
        assert not _gone(pid)
    assert _gone(pid)
    assert not server.running

    server = LocalEtcd(tmp_path)
    with pytest.raises(KeyError):
        _fail_inside(server)
    assert server.pid is not None
    assert _gone(server.pid)


def _fail_inside(server: LocalEtcd) -> None:
    with server:
        assert server.running
        raise KeyError("a failure inside the block")


def test_keys_survive_a_restart_on_the_same_directory(tmp_path: Path) -> None:
    with LocalEtcd(tmp_path) as first, connect(first.endpoint) as client:
        client.put(PREFIX + "phase", "ROLLOUT")
    with LocalEtcd(tmp_path) as second, connect(second.endpoint) as client:
        assert client.get(PREFIX + "phase")[0] == b"ROLLOUT"


def test_a_killed_etcd_is_started_again_and_a_patient_client_rides_out_the_gap(tmp_path: Path) -> None:
    """The watchdog (looking once a second) starts a SIGKILLed etcd again on the same endpoint and data; a
    client with `outage` asking in the gap gets its answer once etcd is back."""
    with LocalEtcd(tmp_path) as server:
        endpoint, pid = server.endpoint, server.pid
        with EtcdWatchdog(server, interval=1.0) as watchdog, connect(endpoint, outage=30) as patient:
            patient.put(PREFIX + "phase", "ROLLOUT")
            os.kill(pid, 9)
            while server.pid == pid and server.running:
                time.sleep(0.01)
            asked = time.monotonic()
            assert patient.get(PREFIX + "phase")[0] == b"ROLLOUT"
            assert time.monotonic() - asked > 0.2  # it did wait for the restart
        # The client can be answered before the watchdog's start returns; leaving its block waits for that.
        assert (server.restarts, watchdog.failure) == (1, None)
        assert server.endpoint == endpoint
        assert server.pid != pid


def test_a_watchdog_that_cannot_start_etcd_again_says_why(tmp_path: Path) -> None:
    with LocalEtcd(tmp_path) as server, EtcdWatchdog(server, interval=0.05) as watchdog:
        server.binary = str(tmp_path / "no-such-etcd")
        os.kill(server.pid, 9)
        deadline = time.monotonic() + 10
        while watchdog.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert watchdog.failure is not None
    assert watchdog.failure.startswith("etcd exited with status -9 and did not start again: etcd binary")


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    server = LocalEtcd(tmp_path, binary=str(tmp_path / "no-such-etcd"))
    with pytest.raises(FileNotFoundError, match="etcd-server"):
        server.start()
    assert server.pid is None


def test_etcd_exiting_at_start_reports_its_log(tmp_path: Path) -> None:
    binary = _script(tmp_path / "etcd", 'echo "flag provided but not defined: -bogus" >&2\nexit 3')
    server = LocalEtcd(tmp_path / "data", binary=binary)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*flag provided but not defined"):
        server.start()
    assert not server.running


def test_unresponsive_etcd_times_out_and_is_killed(tmp_path: Path) -> None:
    ignore_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring SIGTERM', flush=True); time.sleep(120)"
    )
    binary = _script(tmp_path / "etcd", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(ignore_term)}")
    server = LocalEtcd(tmp_path / "data", binary=binary, start_timeout=1.0, stop_grace=0.5)
    start = time.monotonic()
    # The log line shows SIGTERM was ignored, so only the SIGKILL after the grace period ended it.
    with pytest.raises(RuntimeError, match=r"(?s)did not answer.*ignoring SIGTERM"):
        server.start()
    assert time.monotonic() - start >= 1.5
    assert server.pid is not None
    assert _gone(server.pid)


def test_start_retries_when_a_port_is_taken_before_etcd_binds(tmp_path: Path, monkeypatch) -> None:
    real = etcd_server.free_loopback_ports
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # The first pick loses the race for the client port; the retry must pick fresh ports.
        picks = iter([[taken, *real(1)]])
        monkeypatch.setattr(etcd_server, "free_loopback_ports", lambda n: next(picks, None) or real(n))
        with LocalEtcd(tmp_path) as server, connect(server.endpoint) as client:
            assert server.endpoint != f"127.0.0.1:{taken}"
            client.put("k", "v")
    assert "address already in use" in (tmp_path / "etcd.log").read_text()
