"""NVML's view of the GPUs, and the check that a killed vLLM tree gave its device memory back (a fake NVML
module stands in for the driver: this machine has none)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from checkpoint_engine.device_memory import GIB, GpuMemory, left_behind, read_gpus, released


def fake_nvml(gpus: list[tuple[int, int, dict[int, int | None]]]) -> SimpleNamespace:
    """An NVML of GPUs given as (total, used, {pid: bytes}), with pynvml's names and record fields."""
    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=gpus[h][0], used=gpus[h][1], free=gpus[h][0] - gpus[h][1]
        ),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=pid, usedGpuMemory=n) for pid, n in gpus[h][2].items()
        ],
    )


def test_every_gpu_is_read_with_the_processes_that_hold_it() -> None:
    nvml = fake_nvml([(80 * GIB, 5 * GIB, {100: 4 * GIB, 101: None}), (80 * GIB, 0, {})])
    gpus = read_gpus(nvml)
    assert gpus == [
        GpuMemory(index=0, total=80 * GIB, used=5 * GIB, processes={100: 4 * GIB, 101: 0}),  # None: not reported
        GpuMemory(index=1, total=80 * GIB, used=0, processes={}),
    ]
    assert gpus[0].free == 75 * GIB


def test_without_nvml_nothing_is_read_or_checked() -> None:
    assert read_gpus() is None  # no NVIDIA driver on this machine
    assert released(None, GIB, timeout=0.0) == (None, None)


def test_memory_left_beyond_the_margin_names_the_gpu_and_the_processes_that_grew() -> None:
    before = [GpuMemory(0, 80 * GIB, 6 * GIB, {7: 6 * GIB}), GpuMemory(1, 80 * GIB, 1 * GIB, {})]
    within = [GpuMemory(0, 80 * GIB, 6 * GIB + GIB // 2, {7: 6 * GIB + GIB // 2}), before[1]]
    assert left_behind(before, within, margin=GIB) is None
    after = [GpuMemory(0, 80 * GIB, 10 * GIB, {7: 7 * GIB, 42: 3 * GIB}), before[1]]
    problem = left_behind(before, after, margin=GIB)
    assert problem == (
        "GPU 0: 4.00 GiB more in use (pid 42 holds 3.00 GiB more, pid 7 holds 1.00 GiB more) "
        "(phase.device_margin_gib=1)"
    )


def test_the_check_waits_for_the_driver_to_free_a_dead_process() -> None:
    before = [GpuMemory(0, 80 * GIB, GIB, {})]
    readings = iter([[GpuMemory(0, 80 * GIB, 30 * GIB, {55: 29 * GIB})], [GpuMemory(0, 80 * GIB, GIB, {})]])
    after, problem = released(before, GIB, timeout=5.0, read=lambda: next(readings))
    assert problem is None
    assert after == before
    stuck = [GpuMemory(0, 80 * GIB, 30 * GIB, {55: 29 * GIB})]
    after, problem = released(before, GIB, timeout=0.2, read=lambda: stuck)
    assert after == stuck
    assert problem is not None
    assert "pid 55 holds 29.00 GiB more" in problem


@pytest.mark.parametrize("phase_key", ["device/free_bytes_before_vllm/gpu1", "device/free_bytes_after_vllm/gpu1"])
def test_the_free_memory_of_each_gpu_is_in_the_iteration_metrics(phase_key: str) -> None:
    from checkpoint_engine.contracts.acks import StartVllmAck, TerminateVllmAck
    from checkpoint_engine.contracts.phases import Phase
    from engine.iteration_record import ack_metrics

    if "before" in phase_key:
        metrics = ack_metrics(Phase.START_VLLM, {"node0": StartVllmAck(pid=1, seconds=1.0, device_free_bytes=[5, 9])})
    else:
        ack = TerminateVllmAck(pids=[1], rss_freed_bytes=0, killed=True, device_free_bytes=[5, 9])
        metrics = ack_metrics(Phase.TERMINATE_VLLM, {"node0": ack})
    assert metrics[phase_key] == 9.0
    cpu = ack_metrics(Phase.TERMINATE_VLLM, {"node0": TerminateVllmAck(pids=[1], rss_freed_bytes=0, killed=True)})
    assert not any(k.startswith("device/") for k in cpu)


def test_what_offload_leaves_on_the_gpu_is_reported_where_there_is_one() -> None:
    from checkpoint_engine.contracts.acks import MoveAck
    from checkpoint_engine.contracts.phases import Phase
    from engine.iteration_record import ack_metrics

    gpu = MoveAck(
        seconds=0.5,
        bytes_moved=8 * GIB,
        device_bytes_after=0,
        device_bytes_in_use=GIB // 2,
        device_bytes_in_use_before=20 * GIB,
    )
    assert ack_metrics(Phase.OFFLOAD, {"node0": gpu}) == {
        "offload/bytes_moved": 8.0 * GIB,
        "offload/device_bytes_before": 20.0 * GIB,
        "offload/device_bytes_left": GIB / 2,
        "offload/device_bytes_allocated": 0.0,
    }
    cpu = MoveAck(seconds=0.5, bytes_moved=8 * GIB)
    assert ack_metrics(Phase.OFFLOAD, {"node0": cpu}) == {"offload/bytes_moved": 8.0 * GIB}
