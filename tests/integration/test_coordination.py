"""The etcd side of the phase machine against a real etcd 3.4: election and failover, fenced
compare-and-swap of the phase, generation-scoped ack barriers over a whole cycle, node expiry,
the shard registry, and a restarted daemon finding its way back."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from checkpoint_engine.contracts.phases import (
    CYCLE,
    IllegalTransition,
    Phase,
    PhaseState,
    fail,
    initial_state,
    next_state,
)
from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.contracts.weight_region import Manifest, plan_layout, region_name
from checkpoint_engine.coordination_errors import (
    CoordinationTimeout,
    NodeFailedError,
    NodeLostError,
    NotLeaderError,
    PhaseFailedError,
    StaleStateError,
)
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.etcd_keys import Keys
from launch.etcd_server import LocalEtcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
JOB = "test-job"
TTL = 2  # etcd 3.4 with default raft timing grants at least 2 s whatever is asked for
NODES = ["node0", "node1"]
LOG = "checkpoint_engine"  # the coordinator and the node lease log under it


@pytest.fixture
def make(etcd_server: LocalEtcd) -> Iterator[Callable[[str], Coordinator]]:
    """Builds coordinators that each own a client, as separate daemons would; all closed afterwards."""
    made: list[Coordinator] = []

    def build(node: str) -> Coordinator:
        made.append(Coordinator(etcd_server.endpoint, JOB, node, ttl=TTL, http_address=f"127.0.0.1:80{len(made)}"))
        return made[-1]

    yield build
    for coordinator in reversed(made):
        coordinator.close()


def _leader_with_phase(make: Callable[[str], Coordinator]) -> tuple[Coordinator, PhaseState, int]:
    leader = make("node0")
    assert leader.campaign()
    state, revision = leader.init_phase(initial_state())
    return leader, state, revision


def test_exactly_one_of_two_concurrent_campaigns_wins_and_the_other_follows_a_close(make) -> None:
    c0, c1 = make("node0"), make("node1")
    with ThreadPoolExecutor(2) as pool:
        won = dict(zip(NODES, pool.map(Coordinator.campaign, (c0, c1)), strict=True))
    assert sorted(won.values()) == [False, True]
    leader, other = (c0, c1) if won["node0"] else (c1, c0)
    assert c0.leader() == c1.leader() == leader.node
    assert leader.is_leader()
    assert not other.is_leader()
    assert leader.campaign(), "a second campaign by the holder must keep the seat"
    assert not other.campaign(timeout=0.3), "the seat is taken: waiting must end without it"

    leader.close()  # revokes the lease: the seat is vacant at once
    start = time.monotonic()
    assert other.campaign(timeout=TTL + 1)
    assert time.monotonic() - start < 1.0
    assert other.leader() == other.node


def test_a_hung_leader_is_replaced_within_the_ttl_and_fenced_off(make) -> None:
    c0, state, revision = _leader_with_phase(make)
    c1 = make("node1")
    assert not c1.campaign()

    c0.heartbeat.stop()  # a killed or hung process: its lease is not revoked, it runs out
    start = time.monotonic()
    assert c1.campaign(timeout=TTL + 2)
    waited = time.monotonic() - start
    assert TTL / 2 < waited < TTL + 1, f"took the seat after {waited:.2f} s with a {TTL} s lease"
    assert not c0.is_leader()
    with pytest.raises(NotLeaderError, match=r"node0 lost the leadership.*now node1 leads"):
        c0.advance(state, next_state(state))
    # The new leader keeps the job's phase rather than starting over, and carries on from it.
    assert c1.init_phase(initial_state()) == (state, revision)
    assert c1.advance(state, next_state(state)) > revision


def test_a_full_cycle_with_acks_from_both_nodes(make, etcd_client) -> None:
    c0, state, _ = _leader_with_phase(make)
    c1 = make("node1")

    def follow(first: PhaseState) -> list[PhaseState]:
        expected, seen = first, []
        for _ in CYCLE:
            current = c1.wait_phase(expected, timeout=5)
            c1.ack(current, {"node": c1.node, "phase": current.phase.value})
            seen.append(current)
            expected = next_state(current)
        return seen

    with ThreadPoolExecutor(1) as pool:
        follower = pool.submit(follow, state)
        walked = []
        for _ in CYCLE:
            c0.ack(state, {"node": c0.node, "phase": state.phase.value})
            payloads = c0.wait_acks(state, NODES, timeout=5)
            assert payloads == {n: {"node": n, "phase": state.phase.value} for n in NODES}
            walked.append(state)
            new = next_state(state)
            c0.advance(state, new)
            state = new
        assert follower.result(timeout=5) == walked

    final, _ = c1.read_phase()
    assert (final.iteration, final.phase, final.weight_version) == (1, Phase.EXPORT, 1)
    # One key per node, iteration and phase: nothing reused, nothing overwritten.
    ack_keys = [meta.key.decode() for _, meta in etcd_client.get_prefix(Keys(JOB).all_acks)]
    assert len(ack_keys) == len(set(ack_keys)) == len(NODES) * len(CYCLE)
    assert {(s.iteration, s.phase) for s in walked} == {(a.iteration, a.phase) for a in _all_acks(c0, walked)}
    assert c0.acks(walked[-1]).keys() == set(NODES)


def _all_acks(coordinator: Coordinator, states: list[PhaseState]) -> list:
    return [ack for s in states for ack in coordinator.acks(s).values()]


def test_an_illegal_transition_is_refused_naming_both_states(make) -> None:
    c0, state, revision = _leader_with_phase(make)
    skip_ahead = PhaseState(iteration=0, phase=Phase.ROLLOUT, weight_version=0)
    with pytest.raises(IllegalTransition, match=r"EXPORT \(iteration 0\) -> ROLLOUT \(iteration 0\)"):
        c0.advance(state, skip_ahead)
    assert c0.read_phase() == (state, revision)


def test_of_two_writers_from_one_revision_exactly_one_wins(make) -> None:
    c0, state, revision = _leader_with_phase(make)
    for _ in range(5):
        start = threading.Barrier(2)

        def write(expected: PhaseState = state, rev: int = revision, gate: threading.Barrier = start) -> int | str:
            gate.wait()
            try:
                return c0.advance(rev, next_state(expected))
            except StaleStateError as exc:
                return str(exc)

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda _: write(), range(2)))
        (new_revision,) = [o for o in outcomes if isinstance(o, int)]
        (lost,) = [o for o in outcomes if isinstance(o, str)]
        assert f"expected revision {revision}, found revision {new_revision}" in lost
        state, revision = c0.read_phase()
        assert revision == new_revision


def test_the_compare_and_swap_itself_refuses_a_stale_revision(make, monkeypatch) -> None:
    c0, state, revision = _leader_with_phase(make)
    newer = c0.advance(state, next_state(state))
    # Make the pre-check read the stale state, as if the other write landed just after it.
    monkeypatch.setattr(c0, "read_phase", lambda: (state, revision))
    with pytest.raises(StaleStateError, match=f"expected revision {revision}, found revision {newer}") as info:
        c0.advance(state, next_state(state))
    assert info.value.found == next_state(state).__class__(**info.value.found.__dict__)
    assert info.value.found.phase is Phase.START_VLLM
    with pytest.raises(StaleStateError, match=f"expected revision {revision}, found revision {newer}"):
        c0.advance(revision, next_state(state))
    monkeypatch.undo()
    with pytest.raises(StaleStateError, match=rf"expected EXPORT \(iteration 0.*found revision {newer} holding START_"):
        c0.advance(state, next_state(state))


def test_only_the_leader_writes_the_phase(make) -> None:
    _, state, _ = _leader_with_phase(make)
    c1 = make("node1")
    with pytest.raises(NotLeaderError, match=r"node1 may not write the phase: it is not the leader \(node0 is\)"):
        c1.advance(state, next_state(state))
    with pytest.raises(NotLeaderError, match="node1"):
        c1.init_phase(initial_state())


def test_wait_acks_timeout_names_the_silent_node(make) -> None:
    c0, c1 = make("node0"), make("node1")
    state = initial_state()
    c0.ack(state, {"seconds": 0.5})
    c1.ack(next_state(state))  # an ack of another phase does not answer this barrier
    start = time.monotonic()
    with pytest.raises(CoordinationTimeout) as info:
        c0.wait_acks(state, NODES, timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 1.5
    assert isinstance(info.value, TimeoutError)
    assert "acks of EXPORT (iteration 0); no answer from node1 (answered: node0)" in str(info.value)

    c1.ack(state)
    assert c0.wait_acks(state, NODES, timeout=1) == {"node0": {"seconds": 0.5}, "node1": {}}


def test_wait_acks_fails_at_once_on_an_error_ack_naming_node_and_cause(make) -> None:
    c0, c1 = make("node0"), make("node1")
    state = next_state(initial_state())  # START_VLLM
    c0.ack(state)
    c1.ack(state, error="VllmStartError: vLLM exited during start-up")
    start = time.monotonic()
    with pytest.raises(NodeFailedError, match=r"START_VLLM \(iteration 0\) failed on node1: VllmStartError: vLLM exit"):
        c0.wait_acks(state, NODES, timeout=30)
    assert time.monotonic() - start < 2
    assert c0.errors(0) == ["node1 in START_VLLM: VllmStartError: vLLM exited during start-up"]


def test_wait_acks_gives_up_as_soon_as_a_silent_node_expires(make) -> None:
    c0, c1 = make("node0"), make("node1")
    state = initial_state()
    c0.ack(state)
    c1.heartbeat.stop()
    start = time.monotonic()
    with pytest.raises(NodeLostError, match="node1 have no live lease"):
        c0.wait_acks(state, NODES, timeout=30)
    assert time.monotonic() - start < TTL + 1


def test_a_node_that_returns_within_the_grace_is_waited_for(make) -> None:
    """node1 stalls past its TTL (its heartbeat stopped), then comes back on a fresh lease and acks: a barrier
    with `node_grace` waits for it; with the grace over first, the barrier fails naming node1 and the grace."""
    c0, c1 = make("node0"), make("node1")
    state = initial_state()
    c0.ack(state)
    c1.heartbeat.stop()

    def come_back() -> None:
        while "node1" in c0.alive_nodes():
            time.sleep(0.1)
        time.sleep(0.5)
        c1.heartbeat.start()  # its first beat finds the lease gone and registers again
        while "node1" not in c0.alive_nodes():
            time.sleep(0.1)
        c1.ack(state)

    c0.node_grace = 20
    returner = threading.Thread(target=come_back)
    returner.start()
    assert set(c0.wait_acks(state, NODES, timeout=30)) == set(NODES)
    returner.join()

    later = next_state(state)
    c0.ack(later)
    c1.heartbeat.stop()
    c0.node_grace = 1
    start = time.monotonic()
    with pytest.raises(NodeLostError, match=r"node1 have no live lease .* did not return within 1 s \(phase"):
        c0.wait_acks(later, NODES, timeout=30)
    assert time.monotonic() - start < TTL + 3


def test_the_grace_runs_out_across_a_barrier_waited_for_in_slices(make) -> None:
    """The phase loop waits for acks in one-second slices: the grace counts from the first slice that found
    node1 without a lease, so the barrier ends after it instead of waiting for the phase timeout."""
    c0, c1 = make("node0"), make("node1")
    state = initial_state()
    c0.ack(state)
    c1.heartbeat.stop()
    assert _gone(c0, "node1", timeout=TTL + 1)
    c0.node_grace = 1.5
    start, slices = time.monotonic(), 0

    def sliced() -> None:
        nonlocal slices
        while time.monotonic() - start < 10:
            slices += 1
            with contextlib.suppress(CoordinationTimeout):
                c0.wait_acks(state, NODES, timeout=0.4)

    with pytest.raises(NodeLostError, match=r"node1 have no live lease .* did not return within 1.5 s"):
        sliced()
    assert slices >= 3, "the grace outlasted a slice"
    assert time.monotonic() - start < 3


def test_a_campaign_on_a_revoked_lease_is_no_win_and_no_crash(make, etcd_server: LocalEtcd) -> None:
    """A node whose lease was revoked (or ran out unnoticed) campaigns before its heartbeat re-registers it:
    etcd refuses the lease, and the node simply does not take the seat."""
    c0 = make("node0")
    with connect(etcd_server.endpoint) as client:
        client.revoke_lease(c0.lease_id)
    assert not c0.campaign()
    assert c0.leader() is None


def _gone(c: Coordinator, node: str, timeout: float) -> bool:
    """Whether `node`'s record went (its lease revoked or expired) within `timeout` s, as `c` sees it."""
    return poll_until(lambda: None if node in c.alive_nodes() else True, timeout, every=0.05) is not None


def test_a_node_whose_heartbeat_stops_is_gone_within_the_ttl(make) -> None:
    c0, c1 = make("node0"), make("node1")
    alive = c0.alive_nodes()
    assert set(alive) == set(NODES)
    assert (alive["node1"].pid, alive["node1"].http_address) == (os.getpid(), "127.0.0.1:801")
    # The heartbeat keeps the node past its TTL.
    assert not _gone(c0, "node1", timeout=TTL + 0.5)

    c1.heartbeat.stop()
    start = time.monotonic()
    assert _gone(c0, "node1", timeout=TTL + 1)
    assert time.monotonic() - start < TTL + 1
    assert set(c0.alive_nodes()) == {"node0"}
    assert c0.missing_nodes(NODES) == ["node1"]


def test_an_expired_heartbeat_re_registers_loudly_and_loses_the_leadership(make, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    c1, c0 = make("node1"), make("node0")
    assert c1.campaign()
    c1.heartbeat.stop()  # a process stalled for longer than its TTL
    assert _gone(c0, "node1", timeout=TTL + 1)
    assert c0.campaign()

    c1.heartbeat.start()  # the stall ends
    c0.wait_nodes(NODES, timeout=TTL)
    expired = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("[node1] LEASE EXPIRED") and "LEADERSHIP IS LOST" in m for m in expired), expired
    assert not c1.is_leader()
    assert c0.is_leader()
    assert set(c0.alive_nodes()) == set(NODES)


def test_shard_registry_round_trip_and_timeout(make) -> None:
    c0, c1 = make("node0"), make("node1")
    transport = {"kind": "mooncake", "session": "127.0.0.1:17000", "buffer_address": 140000000}
    manifests = {}
    for c in (c0, c1):
        slots, size = plan_layout({"embed.weight": torch.zeros(4, 8, dtype=torch.bfloat16), "bias": torch.ones(3)})
        manifests[c.node] = Manifest(region=region_name(JOB, c.node, 1), version=1, size=size, slots=tuple(slots))
        c.register_shards(1, manifests[c.node].to_dict(), {**transport, "node": c.node})

    records = c0.wait_shards(1, NODES, timeout=1)
    assert records.keys() == set(NODES)
    for node, record in records.items():
        assert Manifest.from_dict(record.manifest) == manifests[node]
        assert record.transport == {**transport, "node": node}
    assert c1.shards(1) == records

    c0.register_shards(2, {**manifests["node0"].to_dict(), "version": 2}, transport)
    with pytest.raises(CoordinationTimeout, match=r"shards of version 2; no answer from node1 .answered: node0"):
        c0.wait_shards(2, NODES, timeout=0.3)
    with pytest.raises(ValueError, match="manifest of version 1 registered as version 3"):
        c0.register_shards(3, manifests["node0"].to_dict(), transport)
    assert set(c0.shards(2)) == {"node0"}


def test_wait_phase_sees_each_state_in_order_and_stops_on_failure(make) -> None:
    c0, state, _ = _leader_with_phase(make)
    c1 = make("node1")
    with pytest.raises(CoordinationTimeout, match=r"for phase START_VLLM .*last seen: EXPORT \(iteration 0"):
        c1.wait_phase(next_state(state), timeout=0.3)

    watching = threading.Event()

    def is_start_vllm(s: PhaseState) -> bool:
        watching.set()  # the first call judges the read that the watch starts after
        return s.phase is Phase.START_VLLM

    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(c1.wait_phase, is_start_vllm, 5)
        assert watching.wait(5)
        # Two writes in a row: the waiter must still see the first one, not only the latest.
        second = next_state(state)
        c0.advance(state, second)
        c0.advance(second, next_state(second))
        assert waiter.result(timeout=5) == second

    current, _ = c0.read_phase()
    c0.advance(current, fail(current))
    with pytest.raises(PhaseFailedError, match="FAILED"):
        c1.wait_phase(next_state(current), timeout=5)
    assert c1.wait_phase(lambda s: s.phase is Phase.FAILED, timeout=1, raise_on_failed=False).phase is Phase.FAILED


def _break_watch_stream(coordinator: Coordinator, watches: int) -> None:
    """Do what pyetcd does when a watch stream breaks: drop every watch of the client and hand each
    callback the error. Waits first until `watches` watches are open."""
    watcher = coordinator.client.watcher
    deadline = time.monotonic() + 5
    while len(watcher._callbacks) < watches:
        assert time.monotonic() < deadline, "the wait never opened its watches"
        time.sleep(0.01)
    with watcher._lock:
        callbacks, watcher._callbacks = dict(watcher._callbacks), {}
    for callback in callbacks.values():
        callback(ConnectionError("stream reset"))


def test_a_broken_watch_stream_resumes_where_it_stopped(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    c0, state, _ = _leader_with_phase(make)
    c1 = make("node1")
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(c1.wait_phase, lambda s: s.phase is Phase.START_VLLM, 5)
        _break_watch_stream(c1, watches=1)
        # Written while the waiter pauses before re-watching: it must still see the first of the two.
        second = next_state(state)
        c0.advance(state, second)
        c0.advance(second, next_state(second))
        assert waiter.result(timeout=5) == second

        # A barrier (acks and node records: two watches) rides over a break the same way.
        third = next_state(second)
        c0.ack(third)
        barrier = pool.submit(c0.wait_acks, third, NODES, 5)
        _break_watch_stream(c0, watches=2)
        c1.ack(third, {"after": "break"})
        assert barrier.result(timeout=5) == {"node0": {}, "node1": {"after": "break"}}
    broke = [r.getMessage() for r in caplog.records if "watch stream broke" in r.getMessage()]
    assert [m.split("]")[0] for m in broke] == ["[node1", "[node0"], broke


def test_a_restarted_daemon_reads_the_job_back(make) -> None:
    c0, state, _ = _leader_with_phase(make)
    second = next_state(state)
    revision = c0.advance(state, second)
    c0.ack(second, {"loaded_version": 0})
    c0.close()

    again = make("node0")
    assert again.read_phase() == (second, revision)
    assert again.acks(second)["node0"].payload == {"loaded_version": 0}
    assert again.campaign(), "the closed run revoked its lease, so the seat is free"
    again.advance(second, next_state(second))


def test_a_daemon_restarted_after_a_kill_takes_over_when_the_old_lease_runs_out(make, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    killed, _, _ = _leader_with_phase(make)
    killed.heartbeat.stop()
    again = make("node0")
    assert "replaced a live record of node0" in caplog.text
    assert not again.campaign(), "the killed run's lease still holds the seat"
    assert again.campaign(timeout=TTL + 1)
    # The node record belongs to the new run's lease, so it outlives the old one.
    assert set(again.alive_nodes()) == {"node0"}
