"""The etcd key layout and the coordination records, without etcd: keys are generation-scoped,
sort numerically, prune by one range, pruning keeps what the controller still reads, and every
record survives a JSON round trip."""

from __future__ import annotations

import pytest

from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState, initial_state, next_state
from checkpoint_engine.etcd_keys import (
    MAX_VALUE_BYTES,
    Ack,
    Keys,
    LeaderRecord,
    NodeStatus,
    Retained,
    ShardRecord,
    attempt_namespace,
    attempts_of,
    check_name,
    counter,
    decode,
    encode,
    last_segment,
    retained,
)


def test_keys_follow_the_architecture_layout() -> None:
    keys = Keys("job1")
    assert keys.phase == "/timeshare/job1/phase"
    assert keys.leader == "/timeshare/job1/leader"
    assert keys.node("node0") == "/timeshare/job1/nodes/node0"
    assert keys.node("node0").startswith(keys.nodes)
    assert keys.ack(3, Phase.TRAIN, "node1") == "/timeshare/job1/acks/00000003/TRAIN/node1"
    assert keys.ack(3, Phase.TRAIN, "node1").startswith(keys.acks(3, Phase.TRAIN))
    assert keys.shard(7, "node1") == "/timeshare/job1/weights/00000007/node1"
    assert keys.shard(7, "node1").startswith(keys.shards(7))
    assert last_segment(keys.shard(7, "node1").encode()) == "node1"


def test_ack_keys_are_never_reused_across_a_cycle() -> None:
    keys, state, seen = Keys("j"), initial_state(), set()
    for _ in range(3 * len(CYCLE)):
        seen.add(keys.ack(state.iteration, state.phase, "node0"))
        state = next_state(state)
    assert len(seen) == 3 * len(CYCLE)


def test_job_prefixes_do_not_overlap() -> None:
    # "/timeshare/a/" must not be a prefix of job "ab"'s keys, or one job would watch another.
    assert not Keys("ab").phase.startswith(Keys("a").root)


@pytest.mark.parametrize("before", [1, 9, 10, 100, 12345])
def test_prune_range_holds_exactly_the_earlier_iterations(before: int) -> None:
    keys = Keys("j")
    start, end = keys.acks_before(before)
    for iteration in sorted({0, before - 1, before, before + 1, 9, 10, 99, 100, 101}):
        key = keys.ack(iteration, Phase.ONLOAD, "node0")
        assert (start <= key < end) == (iteration < before), (iteration, before)
    start, end = keys.shards_before(before)
    for version in (before - 1, before, before + 1):
        assert (start <= keys.shard(version, "n") < end) == (version < before)


@pytest.mark.parametrize("name", ["", "a/b", " node0", "node0\n", "tab\there"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="bad node id"):
        check_name(name, "node id")
    with pytest.raises(ValueError, match="bad job"):
        Keys(name)


@pytest.mark.parametrize("value", [-1, 10**8, 1.0, True, "3"])
def test_counters_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="iteration must be an int"):
        counter(value, "iteration")  # type: ignore[arg-type]


RECORDS = [
    NodeStatus(node="node0", pid=123, host="h", http_address="127.0.0.1:8000", started_at=1.5),
    LeaderRecord(node="node1", elected_at=2.5),
    Ack(node="node0", iteration=4, phase=Phase.ROLLOUT, payload={"seconds": 1.25, "tokens": 99}, acked_at=3.5),
    ShardRecord(
        node="node1",
        version=4,
        manifest={"region": "r", "version": 4, "size": 256, "slots": [], "schema": 1},
        transport={"kind": "shm"},
        registered_at=4.5,
    ),
    PhaseState(iteration=4, phase=Phase.UPDATE_WEIGHTS, weight_version=4, started_at=5.5),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_json(record: object) -> None:
    data = encode(record)
    assert isinstance(data, bytes)
    assert decode(type(record), data) == record


@pytest.mark.parametrize("record", RECORDS[:4], ids=lambda r: type(r).__name__)
def test_unknown_schema_is_refused(record: object) -> None:
    d = {**record.to_dict(), "schema": 2}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="schema 2 is not understood"):
        type(record).from_dict(d)  # type: ignore[attr-defined]


def test_bulk_data_is_refused() -> None:
    ack = Ack(node="n", iteration=0, phase=Phase.TRAIN, payload={"blob": "x" * MAX_VALUE_BYTES}, acked_at=0.0)
    with pytest.raises(ValueError, match="etcd carries coordination only"):
        encode(ack)


def test_retained_keeps_the_previous_iteration_and_the_served_and_exported_versions() -> None:
    state, kept = initial_state(), []
    for _ in range(3 * len(CYCLE)):
        state = next_state(state)
        kept.append((state.iteration, state.phase, retained(state)))
    by_phase = {(i, p): r for i, p, r in kept}
    # During TRAIN of i + 1 the controller still reads the acks of iteration i.
    assert by_phase[2, Phase.TRAIN] == Retained(first_iteration=1, first_version=0)
    # EXPORT of version 2: version 1 is the one served until UPDATE_WEIGHTS loads 2.
    assert by_phase[2, Phase.EXPORT] == Retained(first_iteration=1, first_version=1)
    for iteration, _, r in kept:
        assert r.first_iteration == max(iteration - 1, 0)


@pytest.mark.parametrize("state", [initial_state(), PhaseState(iteration=1, phase=Phase.TRAIN, weight_version=0)])
def test_retained_never_goes_below_zero(state: PhaseState) -> None:
    assert retained(state) == Retained(first_iteration=0, first_version=0)


def test_an_attempt_namespace_belongs_to_its_job_and_to_no_job_that_merely_shares_a_prefix() -> None:
    mine = attempt_namespace("timeshare-7", "slurm-9.0")
    assert mine == "timeshare-7@slurm-9.0"
    assert Keys(mine).phase == "/timeshare/timeshare-7@slurm-9.0/phase"
    found = ["timeshare-7", mine, "timeshare-7@slurm-7.0", "timeshare-70", "timeshare-70@slurm-70.0", "other"]
    assert attempts_of("timeshare-7", found) == ["timeshare-7", "timeshare-7@slurm-7.0", mine]
    with pytest.raises(ValueError, match="bad attempt"):
        attempt_namespace("timeshare-7", "a/b")
