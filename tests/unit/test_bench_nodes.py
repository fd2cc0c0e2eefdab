"""The pure parts of `timeshare bench nodes`: dealing nodes to workers, reading etcd's metrics, the latencies."""

from __future__ import annotations

import pytest

from checkpoint_engine.contracts.phases import CYCLE, Phase
from launch.bench_nodes import advances, node_ids, parse_metrics, percentile, slices

METRICS = """# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server.
# TYPE grpc_server_msg_received_total counter
grpc_server_msg_received_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 120
grpc_server_msg_received_total{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 30
grpc_server_msg_received_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 7
etcd_network_client_grpc_received_bytes_total 4096
etcd_network_client_grpc_sent_bytes_total 1.5e+06
etcd_debugging_mvcc_watch_stream_total 9
etcd_debugging_mvcc_watcher_total 8
etcd_mvcc_db_total_size_in_bytes 2.5e+07
"""


def test_parse_metrics_sums_the_wanted_series_and_splits_requests_by_method() -> None:
    found = parse_metrics(METRICS)
    assert found["requests"] == 157
    assert (found["requests/Range"], found["requests/Put"], found["requests/Watch"]) == (120, 30, 7)
    assert (found["bytes_in"], found["bytes_out"]) == (4096, 1.5e6)
    assert (found["watch_streams"], found["watchers"]) == (9, 8)
    assert "etcd_mvcc_db_total_size_in_bytes" not in found


@pytest.mark.parametrize(("count", "processes", "sizes"), [(8, 4, [2, 2, 2, 2]), (5, 2, [3, 2]), (3, 8, [1, 1, 1])])
def test_slices_deal_every_node_once_and_leave_no_worker_empty(count: int, processes: int, sizes: list[int]) -> None:
    nodes = node_ids(count)
    dealt = slices(nodes, processes)
    assert [len(s) for s in dealt] == sizes
    assert sorted(n for s in dealt for n in s) == nodes


def test_percentile_picks_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 51.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def _records(nodes: int, iterations: int) -> list[dict]:
    """Every node acks every phase at t, the leader (node 0) commits the next at t + 1, node k sees it at t + 2 + k."""
    records = [{"node": f"n{k}", "seen": [], "acked": [], "advanced": []} for k in range(nodes)]
    t = 0.0
    for iteration in range(iterations):
        for phase in CYCLE:
            nxt = (iteration + 1, Phase.TRAIN.value) if phase is Phase.ONLOAD else (iteration, _after(phase))
            for k, record in enumerate(records):
                record["acked"].append((iteration, phase.value, t - k * 0.1))
                record["seen"].append((*nxt, t + 2 + k))
            records[0]["advanced"].append((*nxt, t + 1))
            t += 10
    return records


def _after(phase: Phase) -> str:
    return CYCLE[CYCLE.index(phase) + 1].value


def test_advances_time_each_phase_change_from_the_last_ack_to_the_last_node_that_saw_it() -> None:
    found = advances(_records(nodes=3, iterations=2), first=0, last=2)
    assert len(found) == 2 * len(CYCLE)
    assert {round(a.committed - a.last_ack, 6) for a in found} == {1.0}
    assert {round(a.all_seen - a.committed, 6) for a in found} == {3.0}  # node 2 saw it 2 s after node 0


def test_advances_leave_out_a_phase_change_that_some_node_never_saw() -> None:
    records = _records(nodes=3, iterations=1)
    records[2]["seen"] = [s for s in records[2]["seen"] if s[1] != Phase.ROLLOUT.value]
    found = advances(records, first=0, last=1)
    assert len(found) == len(CYCLE) - 1
