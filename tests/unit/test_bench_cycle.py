"""`timeshare bench cycle` and `bench partial`: the summary of a run (per-phase means after the first
iteration, the switch share) and the standalone baseline's requests, rebuilt from a rollout batch."""

from __future__ import annotations

import json

import pytest

from engine.batch import collate
from engine.replay_buffer import Group
from engine.trajectory import Trajectory
from launch import bench_partial
from launch.bench_cycle import PHASES, later_iterations, summarize, switch_and_push
from launch.bench_standalone import requests_from_batch


def test_summary_skips_the_first_iteration_and_computes_the_switch_share(capsys: pytest.CaptureFixture) -> None:
    def row(i: int, scale: float) -> dict[str, float]:
        return {"iteration": i, **{f"time/{p}": scale for p in PHASES}}

    total = summarize("terminate", later_iterations("terminate", [row(0, 50.0), row(1, 1.0), row(2, 3.0)]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert total == pytest.approx(2.0 * len(PHASES))  # iterations 1 and 2 only: each phase 2 s on average
    (switch,) = [x for x in lines if x["measure"] == "switch_overhead"]
    assert switch["ratio"] == pytest.approx(6 / 8)  # six of the eight phases are the switch


def test_the_switches_push_gap_and_device_memory_have_lines_of_their_own(capsys: pytest.CaptureFixture) -> None:
    times = {f"time/{p}": 1.0 for p in PHASES}
    gpu = {
        "offload/device_bytes_before": 30e9,
        "offload/device_bytes_left": 1e9,
        "device/free_bytes_after_vllm/gpu0": 7e10,
    }
    rows = [
        {"iteration": 1, **times, "push/gb_per_s": 2.0, "push/bytes": 1e9, "logprob_gap/mean_abs": 0.01, **gpu},
        {"iteration": 2, **times, "time/onload": 3.0, "push/gb_per_s": 4.0, "push/bytes": 1e9, **gpu},
    ]
    switch_and_push("terminate", rows)
    lines = {x["measure"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["switch"]["train_to_rollout_seconds"] == 4.0  # offload, export, start_vllm, update_weights
    assert lines["switch"]["rollout_to_train_seconds"] == 3.0  # terminate_vllm 1 s, onload 2 s on average
    assert lines["push"]["gb_per_s"] == 3.0
    assert lines["push"]["load_gb_per_s"] == 1.0  # 1 GB in UPDATE_WEIGHTS' 1 s
    assert lines["push"]["via"] == "shm"
    assert "device_copy_gb_per_s" not in lines["push"]  # no GPU here
    assert lines["logprob_gap"]["mean_abs"] == 0.01  # the one iteration that measured it
    assert lines["device_memory_bytes"] == {
        "bench": "cycle",
        "lifecycle": "terminate",
        "measure": "device_memory_bytes",
        "device_free_bytes_after_vllm_gpu0": 70_000_000_000,
        "offload_device_bytes_before": 30_000_000_000,
        "offload_device_bytes_left": 1_000_000_000,
    }
    switch_and_push("terminate", [{"iteration": 1, **times}])  # a CPU run: no device line
    assert "device_memory_bytes" not in capsys.readouterr().out
    switch_and_push("terminate", [{**rows[0], "push/cuda_ipc": 1.0}])
    lines = {x["measure"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["push"]["via"] == "cuda_ipc"


def test_a_run_without_a_later_iteration_is_refused() -> None:
    with pytest.raises(SystemExit, match="two or more iterations"):
        later_iterations("keep_alive", [{"iteration": 0}])


def test_the_standalone_replays_each_trajectorys_prompt_and_response_length() -> None:
    def trajectory(i: int, prompt: list[int], length: int) -> Trajectory:
        return Trajectory("p", i, prompt, list(range(40, 40 + length)), [-0.5] * length, [2] * length, "stop", 1.0)

    group = Group("p", (trajectory(0, [5, 6, 7], 4), trajectory(1, [5, 6, 7], 1)))
    other = Group("q", (trajectory(0, [9], 2), trajectory(1, [9], 6)))
    batch = collate([group, other], current_version=2, staleness="keep", pad_id=0)
    assert requests_from_batch(batch) == [([5, 6, 7], 4), ([5, 6, 7], 1), ([9], 2), ([9], 6)]


def test_bench_partial_reports_time_and_accuracy_and_refuses_a_budget_at_the_cap(
    capsys: pytest.CaptureFixture,
) -> None:
    rows = [
        {"iteration": 0, "eval/accuracy": 0.25, **{f"time/{p}": 9.0 for p in PHASES}},
        {"iteration": 1, "rollout/partial_share": 0.5, **{f"time/{p}": 1.0 for p in PHASES}},
        {"iteration": 2, "eval/accuracy": 0.5, "rollout/partial_share": 0.3, **{f"time/{p}": 2.0 for p in PHASES}},
    ]
    assert bench_partial.summarize("partial", rows) == pytest.approx((1.5 * len(PHASES), 1.5))
    iteration, accuracy = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert iteration["rollout_seconds"] == 1.5
    assert iteration["partial_share"] == pytest.approx(0.4)
    assert (accuracy["first"], accuracy["last"]) == (0.25, 0.5)
    with pytest.raises(SystemExit, match=r"iteration_token_budget \(64\) must be below .*max_response_tokens \(64\)"):
        bench_partial.main(["rollout.iteration_token_budget=64"])
