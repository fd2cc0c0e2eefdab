"""The push planner: buckets, the bytes each node and link carries, and the predicted time per strategy."""

from __future__ import annotations

import json

import pytest

from checkpoint_engine.push_plan import Bandwidths, make_buckets, plan_push
from launch import bench_plan

GB = 10**9
BW = Bandwidths(source=10.0, link=5.0, load=20.0)


def test_buckets_hold_whole_tensors_in_order_and_are_dealt_over_the_nodes() -> None:
    tensors = [("a", 5), ("b", 5), ("c", 5), ("d", 12), ("e", 1)]
    buckets = make_buckets(tensors, bucket_bytes=10, nodes=3)
    assert [(b.nbytes, b.tensors, b.first, b.owner) for b in buckets] == [
        (10, 2, "a", 0),
        (5, 1, "c", 1),
        (12, 1, "d", 2),  # larger than a bucket: a bucket of its own
        (1, 1, "e", 0),
    ]
    with pytest.raises(ValueError, match="bucket_bytes > 0"):
        make_buckets(tensors, bucket_bytes=0)


@pytest.mark.parametrize("nodes", [2, 8, 256])
def test_the_head_strategy_sends_every_copy_from_the_head_one_stage_after_another(nodes: int) -> None:
    tensors = [(f"t{i}", GB) for i in range(10)]
    plan = plan_push(tensors, nodes=nodes, strategy="head", bucket_bytes=GB, bandwidths=BW)
    assert len(plan.buckets) == 1  # the whole region
    assert plan.send_bytes[0] == (nodes - 1) * 10 * GB
    assert set(plan.recv_bytes[1:]) == {10 * GB}
    assert len(plan.link_bytes) == nodes - 1
    assert plan.stage_seconds == pytest.approx({"source": 1.0, "transfer": 2.0 * (nodes - 1), "load": 0.5})
    assert plan.predicted_seconds == pytest.approx(1.5 + 2.0 * (nodes - 1))
    assert plan.bottleneck == "transfer"


@pytest.mark.parametrize("nodes", [2, 8, 256])
def test_the_ring_carries_the_model_once_per_link_and_overlaps_the_stages(nodes: int) -> None:
    tensors = [(f"t{i}", GB) for i in range(nodes * 4)]  # four 1 GB buckets per node
    plan = plan_push(tensors, nodes=nodes, strategy="ring", bucket_bytes=GB, bandwidths=BW)
    total = nodes * 4 * GB
    assert len(plan.buckets) == nodes * 4
    assert len(plan.link_bytes) == nodes
    assert set(plan.link_bytes.values()) == {total * (nodes - 1) // nodes}  # every bucket but the receiver's own
    assert set(plan.recv_bytes) == {total * (nodes - 1) // nodes}
    slowest = max(plan.stage_seconds.values())
    assert slowest < plan.predicted_seconds < slowest + 0.3 + (nodes - 1) / 5.0  # one bucket's stages, the fill
    head = plan_push(tensors, nodes=nodes, strategy="head", bucket_bytes=GB, bandwidths=BW)
    assert plan.predicted_seconds < head.predicted_seconds


def test_one_node_moves_nothing_between_nodes() -> None:
    plan = plan_push([("w", GB)], nodes=1, strategy="ring", bucket_bytes=GB, bandwidths=BW)
    assert plan.link_bytes == {}
    assert plan.stage_seconds["transfer"] == 0.0
    assert plan.predicted_seconds == pytest.approx(0.1 + 0.05)


def test_bad_bandwidths_and_strategies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"bandwidths must be > 0 GB/s, got \{'link': 0.0\}"):
        Bandwidths(source=1.0, link=0.0, load=1.0)
    with pytest.raises(ValueError, match=r"strategy must be one of \['head', 'ring'\]"):
        plan_push([("w", 1)], nodes=2, strategy="tree", bucket_bytes=1, bandwidths=BW)  # type: ignore[arg-type]


def test_bench_plan_prints_a_line_per_node_count_and_strategy_for_kimi_k2_in_fp8(capsys) -> None:
    argv = ["kimi-k2", "--nodes", "2", "32", "--gpus-per-node", "8", "--dtype", "fp8", "--bucket-gib", "2.99"]
    assert bench_plan.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["nodes"], r["strategy"]) for r in rows] == [(2, "head"), (2, "ring"), (32, "head"), (32, "ring")]
    assert {r["parameters"] for r in rows} == {1_026_408_232_448}
    assert all(1.02e12 < r["model_bytes"] < 1.04e12 for r in rows)  # one byte a weight, plus block scales
    by = {(r["nodes"], r["strategy"]): r for r in rows}
    assert by[(32, "head")]["node_send_bytes_max"] == 31 * by[(32, "head")]["model_bytes"]
    assert by[(32, "head")]["bottleneck"] == "transfer"
    assert by[(32, "ring")]["bottleneck"] == "source"  # the host-to-device copy, as in checkpoint-engine
    assert by[(32, "ring")]["predicted_s"] < by[(32, "head")]["predicted_s"] / 4


def test_bench_plan_names_what_it_does_not_know(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit):
        bench_plan.main([str(tmp_path)])
    with pytest.raises(SystemExit, match=r"neither a config\.json"):
        bench_plan.main([str(tmp_path / "missing")])
