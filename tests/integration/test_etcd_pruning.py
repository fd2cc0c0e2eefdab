"""The leader prunes what finished iterations leave in etcd: fifty iterations of the phase machine
against a real etcd 3.4 leave as many keys under the job's prefix as three did, and what the
controller and a restarted node still read (the previous iteration's acks, the served and the
exported version's shard records) is still there."""

from __future__ import annotations

import pytest

from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState, initial_state, next_state
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.etcd_keys import Keys
from launch.etcd_server import LocalEtcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
JOB = "prune-job"
NODES = ("node0", "node1")
ITERATIONS = 50
TTL = 2
# phase, leader, one record per node; the acks of one whole iteration; two versions of shard records
STEADY_KEYS = 2 + len(NODES) + len(NODES) * len(CYCLE) + 2 * len(NODES)


def _step(leader: Coordinator, follower: Coordinator, state: PhaseState) -> PhaseState:
    """One phase as the daemons run it: every node does its part and acks, the leader advances."""
    for node in (leader, follower):
        assert node.wait_phase(state, timeout=5) == state
        if state.phase is Phase.EXPORT:
            manifest = {"region": f"{JOB}-{node.node}-{state.weight_version}", "version": state.weight_version}
            node.register_shards(state.weight_version, manifest, {"kind": "shm"})
        node.ack(state, {"node": node.node})
    leader.wait_acks(state, NODES, timeout=5)
    new = next_state(state)
    leader.advance(state, new)
    return new


def _count(coordinator: Coordinator) -> int:
    return coordinator.client.get_prefix_response(Keys(JOB).root, count_only=True).count


def test_fifty_iterations_leave_as_many_keys_as_three(etcd_server: LocalEtcd) -> None:
    after: dict[int, int] = {}  # keys under the job's prefix once ONLOAD of an iteration finished
    with (
        Coordinator(etcd_server.endpoint, JOB, NODES[0], ttl=TTL) as leader,
        Coordinator(etcd_server.endpoint, JOB, NODES[1], ttl=TTL) as follower,
    ):
        assert leader.campaign()
        state, _ = leader.init_phase(initial_state())
        while len(after) <= ITERATIONS:
            state = _step(leader, follower, state)
            if state.phase is Phase.TRAIN:
                after[state.iteration - 1] = _count(leader)

        assert after[ITERATIONS] == after[3] == STEADY_KEYS, after
        assert max(after.values()) == STEADY_KEYS, after
        # TRAIN of iteration 51: the controller reads the acks of 50 now; 49's are gone.
        assert (state.iteration, state.phase, state.weight_version) == (ITERATIONS + 1, Phase.TRAIN, ITERATIONS)
        acks = follower.iteration_acks(ITERATIONS)
        assert set(acks) == set(CYCLE)
        assert all(set(by_node) == set(NODES) for by_node in acks.values())
        assert follower.iteration_acks(ITERATIONS - 1) == {}
        # Shard records: the version served (50) and the one before it; nothing older.
        assert set(follower.shards(ITERATIONS)) == set(follower.shards(ITERATIONS - 1)) == set(NODES)
        assert follower.shards(ITERATIONS - 2) == {}
