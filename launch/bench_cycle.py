"""`timeshare bench cycle`: what one iteration costs, phase by phase, with each vLLM lifecycle.

Runs the real job (`timeshare train`: etcd, checkpoint engine, Megatron ranks, vLLM) once per
lifecycle on the same small configuration, then reads the run's `metrics.jsonl`. One JSON line per
measure, all from this one invocation (this machine is shared and noisy: only same-run ratios mean
something):
- `phase`: mean seconds of each phase over the iterations after the first (the first also starts
  the processes and does the cold start);
- `switch_overhead`: (offload + export + start_vllm + update_weights + terminate_vllm + onload) /
  the whole iteration; on a CPU machine the standby's imports overlap TRAIN and slow it, which
  `train` shows and this ratio does not;
- `iteration`: mean seconds per iteration, and keep_alive's against terminate's;
- `rollout_tokens_per_second`: vLLM's output inside the loop (tokens over the time in its
  generate calls).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from checkpoint_engine.contracts.phases import CYCLE

SWITCH = ("offload", "export", "start_vllm", "update_weights", "terminate_vllm", "onload")
PHASES = tuple(p.value.lower() for p in CYCLE)


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "cycle", **record}), flush=True)


def run_job(lifecycle: str, overrides: list[str], root: Path) -> list[dict[str, float]]:
    """One `timeshare train` run; its metrics rows."""
    args = [*overrides, f"rollout.lifecycle={lifecycle}", f"run.root={root}", "run.progress=false"]
    log = root / f"{lifecycle}.log"
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "launch.cli", "train", *args], stdout=out, stderr=subprocess.STDOUT
        )
    if code != 0:
        raise SystemExit(f"timeshare train ({lifecycle}) exited with {code}; see {log}")
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(lifecycle: str, rows: list[dict[str, float]]) -> float:
    """Emit the lines of one lifecycle; returns its mean iteration seconds."""
    later = [r for r in rows if r["iteration"] >= 1 and all(f"time/{p}" in r for p in PHASES)]
    if not later:
        raise SystemExit(f"{lifecycle}: no complete iteration after the first; raise --iterations")
    means = {p: sum(r[f"time/{p}"] for r in later) / len(later) for p in PHASES}
    iteration = sum(means.values())
    for phase, seconds in means.items():
        _emit(lifecycle=lifecycle, measure="phase", phase=phase, seconds=round(seconds, 3))
    switch = sum(means[p] for p in SWITCH)
    _emit(lifecycle=lifecycle, measure="switch_overhead", seconds=round(switch, 3), ratio=round(switch / iteration, 3))
    _emit(lifecycle=lifecycle, measure="iteration", seconds=round(iteration, 3), iterations=len(later))
    rates = [r["rollout/tokens_per_second"] for r in later if "rollout/tokens_per_second" in r]
    if rates:
        _emit(lifecycle=lifecycle, measure="rollout_tokens_per_second", value=round(sum(rates) / len(rates), 1))
    return iteration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench cycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--lifecycles", nargs="+", default=["terminate", "keep_alive"], choices=["terminate", "keep_alive"])
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs")
    args = ap.parse_args(argv)
    overrides = [f"run.iterations={args.iterations}", "run.eval_every=1000", *args.overrides]
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="timeshare-bench-cycle-") as tmp:
        for lifecycle in args.lifecycles:
            root = Path(tmp) / lifecycle
            root.mkdir()
            seconds[lifecycle] = summarize(lifecycle, run_job(lifecycle, overrides, root))
    if {"terminate", "keep_alive"} <= set(seconds):
        ratio = seconds["keep_alive"] / seconds["terminate"]
        _emit(measure="iteration_keep_alive_vs_terminate", ratio=round(ratio, 3))
    return 0
