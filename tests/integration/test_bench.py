"""`timeshare bench push` runs end to end on small sizes and prints one JSON line per result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_push_prints_json_lines_with_same_run_baselines() -> None:
    cmd = [sys.executable, "-m", "launch.cli", "bench", "push", "--mib", "8", "--repeats", "1", "--skip", "vllm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {
        *("memcpy", "shm_push", "memcpy_fresh", "shm_push_fresh", "checksum"),
        *("mooncake_copy", "mooncake_tcp_pull"),
    }
    assert all(r["bench"] == "push" and r["bytes"] >= 8 << 20 and r["gb_per_s"] > 0 for r in rows)
    assert cases["shm_push"]["ratio_to_memcpy"] > 0
    assert cases["mooncake_tcp_pull"]["ratio_to_memcpy"] > 0
    assert not list(Path("/dev/shm").glob("timeshare-bench-*"))


def test_bench_partial_measures_decode_time_per_step_and_token_up_to_a_rollouts_batch() -> None:
    code = (
        "from launch.bench_partial import decode_scaling; from launch.config_loading import load_config\n"
        "if __name__ == '__main__':\n"
        "    decode_scaling(load_config(['model.layers=2', 'rollout.prompts_per_iteration=9', "
        "'rollout.group_size=2']), steps=4)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["batch"] for r in rows] == [1, 16, 18]  # up to the rollout's 9 x 2 trajectories
    assert all(r["measure"] == "decode_scaling" and r["step_ms"] > 0 and r["token_us"] > 0 for r in rows)
    assert rows[-1]["token_us"] == pytest.approx(1e3 * rows[-1]["step_ms"] / 18, rel=0.05)


def test_bench_sandbox_prints_the_cost_per_program_and_the_throughput_per_worker_count() -> None:
    cmd = [sys.executable, "-m", "launch.cli", "bench", "sandbox", "--repeats", "2", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["measure"] for r in rows] == ["process", "program", "throughput", "throughput"]
    process, program, one, two = rows
    assert program["ms"] > process["ms"] > 0  # the sandbox costs more than the bare interpreter
    assert [one["workers"], two["workers"]] == [1, 2]
    assert one["programs"] == two["programs"] > one["responses"] > 0  # every test case of every record ran
    assert one["ratio_to_first"] == 1.0
    assert two["programs_per_s"] > 0


def test_bench_nodes_drives_iterations_of_simulated_nodes_and_survives_the_leaders_lease_revoked() -> None:
    cmd = [sys.executable, "-m", "launch.cli", "bench", "nodes", "--nodes", "3", "5", "--processes", "2"]
    cmd += ["--warmup", "1", "--iterations", "2", "--timeout", "120"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["bench"], r["nodes"], r["processes"]) for r in rows] == [("nodes", 3, 2), ("nodes", 5, 2)]
    for r in rows:
        assert r["phase_changes"] == 2 * 8  # every phase change of the window, seen by every node
        assert 0 < r["advance_ms"]["p50"] <= r["advance_ms"]["p99"]
        assert r["barrier_ms"]["p50"] > 0
        assert r["fanout_ms"]["p50"] >= 0
        assert r["requests_by_method"]["Put"] > 0  # acks
        # one fenced advance per phase; the window's edges are etcd scrapes that race the nodes' next advance
        # (handlers that only ack advance within milliseconds), so over 2 iterations one Txn may fall either side
        assert abs(r["requests_by_method"]["Txn"] - 8) <= 0.5
        assert r["bytes_out"] > r["bytes_in"] > 0
        assert r["keys"] > r["nodes"]  # node records, the phase, the leader and the acks kept
        assert r["watch_streams"] >= r["nodes"]  # one client per simulated node
        # the deposed leader's loop survived (the job moved on, which needs its acks) and someone else, or it
        # again on a fresh lease, leads
        failover = r["failover"]
        assert failover["deposed"].startswith("node")
        assert 0 < failover["elected_s"] <= failover["resumed_s"] < 60


def test_bench_plan_measures_this_machine_and_puts_the_push_it_measured_beside_the_prediction() -> None:
    cmd = [sys.executable, "-m", "launch.cli", "bench", "plan", "default", "--dtype", "float32", "--measure"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r.get("case"), r["strategy"]) for r in rows] == [(None, "head"), (None, "ring"), ("measured", "head")]
    assert all(r["bandwidths_from"] == "this machine (64 MiB)" and min(r["gbps"].values()) > 0 for r in rows)
    measured = rows[-1]
    assert measured["bytes"] >= rows[0]["model_bytes"] > 0  # the region holds every tensor (aligned)
    assert measured["measured_s"] == pytest.approx(measured["source_s"] + measured["transfer_s"], abs=0.002)
    assert measured["predicted_s"] > 0
    assert not list(Path("/dev/shm").glob("timeshare-bench-*"))
