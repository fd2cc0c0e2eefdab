"""`timeshare bench cycle`: what one iteration costs, phase by phase, with each vLLM lifecycle.

Runs the real job (`timeshare train`: etcd, checkpoint engine, Megatron ranks, vLLM) once per
lifecycle on the same small configuration, then reads the run's `metrics.jsonl`. One JSON line per
measure, all from this one invocation (this machine is shared and noisy: only same-run ratios mean
something):
- `phase`: mean seconds of each phase over the iterations after the first (the first also starts
  the processes and does the cold start);
- `switch_overhead`: (offload + export + start_vllm + update_weights + terminate_vllm + onload) /
  the whole iteration (vLLM's zygote imports once per job, niced, so TRAIN keeps the CPU);
- `iteration`: mean seconds per iteration, and keep_alive's against terminate's;
- `switch`: train -> rollout (offload, export, start_vllm, update_weights) and rollout -> train
  (terminate_vllm, onload) apart; `push`: the trainer's write into the region and vLLM's load, in GB/s,
  by which path (`via`: shm, or cuda_ipc on a GPU), and a device-to-device copy of as many bytes where
  there is a GPU; `logprob_gap`; on GPUs `device_memory_bytes`: the trainer's GPU before and after
  OFFLOAD, and each GPU's free memory before vLLM starts and once it is gone;
- `rollout_tokens_per_second`: vLLM's output inside the loop (tokens over the time in its
  generate calls), against a standalone vLLM serving the same requests (`launch/bench_standalone.py`:
  the same settings and prompts, as many tokens as each response had) right after the job, the
  ratio of the two, and the share of the loop's generate requests spent outside vLLM (HTTP, JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import get_args

from checkpoint_engine.contracts.config import Lifecycle
from checkpoint_engine.contracts.phases import CYCLE

TO_ROLLOUT = ("offload", "export", "start_vllm", "update_weights")  # the switch train -> rollout
TO_TRAIN = ("terminate_vllm", "onload")  # and back
SWITCH = (*TO_ROLLOUT, *TO_TRAIN)
PHASES = tuple(p.value.lower() for p in CYCLE)


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "cycle", **record}), flush=True)


def run_job(name: str, overrides: list[str], root: Path) -> Path:
    """One `timeshare train` run (`name` names its log) in the empty directory `root`; its run directory."""
    args = [*overrides, f"run.root={root}", "run.progress=false"]
    log = root / f"{name}.log"
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "launch.cli", "train", *args], stdout=out, stderr=subprocess.STDOUT
        )
    if code != 0:  # the log goes with a temporary root: its end is in the message
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"timeshare train ({name}) exited with {code}; the end of {log}:\n{tail}")
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def later_iterations(name: str, rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """The metrics rows of the complete iterations after the first (which also starts every process)."""
    later = [r for r in rows if r["iteration"] >= 1 and all(f"time/{p}" in r for p in PHASES)]
    if not later:
        raise SystemExit(f"{name}: no complete iteration after the first (a run of two or more iterations is needed)")
    return later


def summarize(lifecycle: str, later: list[dict[str, float]]) -> float:
    """Emit the phase lines of one lifecycle; returns its mean iteration seconds."""
    means = {p: sum(r[f"time/{p}"] for r in later) / len(later) for p in PHASES}
    iteration = sum(means.values())
    for phase, seconds in means.items():
        _emit(lifecycle=lifecycle, measure="phase", phase=phase, seconds=round(seconds, 3))
    switch = sum(means[p] for p in SWITCH)
    _emit(lifecycle=lifecycle, measure="switch_overhead", seconds=round(switch, 3), ratio=round(switch / iteration, 3))
    _emit(lifecycle=lifecycle, measure="iteration", seconds=round(iteration, 3), iterations=len(later))
    return iteration


def _mean(later: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in later if key in r]
    return sum(values) / len(values) if values else None


def switch_and_push(lifecycle: str, later: list[dict[str, float]]) -> None:
    """The two switches apart (k1.5 reports under a minute and about 10 s at its scale), the push's rate,
    the trainer-vs-vLLM logprob gap, and on GPUs what each side left of the device's memory."""
    means = {p: _mean(later, f"time/{p}") or 0.0 for p in SWITCH}
    _emit(
        lifecycle=lifecycle,
        measure="switch",
        train_to_rollout_seconds=round(sum(means[p] for p in TO_ROLLOUT), 3),
        rollout_to_train_seconds=round(sum(means[p] for p in TO_TRAIN), 3),
    )
    push, pushed = _mean(later, "push/gb_per_s"), _mean(later, "push/bytes")
    if push is not None and pushed is not None:
        _emit(
            lifecycle=lifecycle,
            measure="push",
            via="cuda_ipc" if _mean(later, "push/cuda_ipc") else "shm",
            gb_per_s=round(push, 3),  # the trainer's write into the region (EXPORT, after the conversion)
            load_gb_per_s=round(pushed / max(means["update_weights"], 1e-9) / 1e9, 3),  # vLLM's verify and load
            bytes=int(pushed),
            **_device_copy(pushed),
        )
    gap = _mean(later, "logprob_gap/mean_abs")
    if gap is not None:
        _emit(lifecycle=lifecycle, measure="logprob_gap", mean_abs=gap)
    keys = sorted({k for r in later for k in r if k.startswith(("device/", "offload/device_bytes"))})
    device = {k.replace("/", "_"): int(_mean(later, k) or 0) for k in keys}
    if device:  # only where there is a GPU (NVML, torch.cuda)
        _emit(lifecycle=lifecycle, measure="device_memory_bytes", **device)


def _device_copy(nbytes: float) -> dict[str, float]:
    """A device-to-device copy of the push's bytes on this machine's GPU, the bound a same-GPU push could reach
    (best of 5 after a warm-up); nothing without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    src = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return {"device_copy_gb_per_s": round(nbytes / best / 1e9, 1)}


def compare_rollout_rate(lifecycle: str, later: list[dict[str, float]], run_dir: Path) -> None:
    """vLLM's output rate inside the loop against a standalone vLLM serving the same rollouts' requests."""
    rolled = [r for r in later if "rollout/tokens_per_second" in r]
    if not rolled:
        return
    in_loop = sum(r["rollout/tokens_per_second"] for r in rolled) / len(rolled)
    serving = sum(r.get("rollout/serving_share", 0.0) for r in rolled) / len(rolled)
    config = json.loads((run_dir / "config.json").read_text())["rollout"]
    batches = [str(run_dir / "rollouts" / f"iter_{int(r['iteration']):05d}.pt") for r in rolled]
    (settings,) = (run_dir / "logs").glob("vllm-*.json")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.bench_standalone",
            str(settings),
            *batches,
            f"--temperature={config['temperature']}",
            f"--top-p={config['top_p']}",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"the standalone vLLM exited with {out.returncode}:\n{out.stderr[-3000:]}")
    standalone = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_second"]
    _emit(
        lifecycle=lifecycle,
        measure="rollout_tokens_per_second",
        value=round(in_loop, 1),
        standalone=round(standalone, 1),
        ratio=round(in_loop / standalone, 3),
        serving_share=round(serving, 3),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench cycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=4)
    lifecycles = list(get_args(Lifecycle))
    ap.add_argument("--lifecycles", nargs="+", default=lifecycles, choices=lifecycles)
    ap.add_argument(
        "--sleep-level", type=int, default=0, choices=(0, 1, 2), help="rollout.sleep_level of the keep_alive run (GPU)"
    )
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs")
    args = ap.parse_args(argv)
    overrides = [f"run.iterations={args.iterations}", "run.eval_every=1000", *args.overrides]
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="timeshare-bench-cycle-") as tmp:
        for lifecycle in args.lifecycles:
            root = Path(tmp) / lifecycle
            root.mkdir()
            sleep = [f"rollout.sleep_level={args.sleep_level}"] if lifecycle == "keep_alive" else []
            run_dir = run_job(lifecycle, [*overrides, f"rollout.lifecycle={lifecycle}", *sleep], root)
            rows = read_rows(run_dir)
            later = later_iterations(lifecycle, rows)
            seconds[lifecycle] = summarize(lifecycle, later)
            switch_and_push(lifecycle, later)
            compare_rollout_rate(lifecycle, later, run_dir)
    if {"terminate", "keep_alive"} <= set(seconds):
        ratio = seconds["keep_alive"] / seconds["terminate"]
        _emit(measure="iteration_keep_alive_vs_terminate", ratio=round(ratio, 3))
    return 0
