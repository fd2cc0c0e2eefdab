"""`timeshare bench partial`: what partial rollouts save on a long-tailed task, at equal prompts per iteration.

Runs the real job twice on the same configuration (the default task unless overridden): with partial
rollouts (`rollout.iteration_token_budget` below `max_response_tokens`: long answers stop at the
budget and continue next iteration from the replay buffer) and without (the budget raised to the cap:
every answer is generated whole within its iteration). One JSON line per measure, from this one
invocation:
- `iteration`: mean seconds per iteration after the first, with the rollout's and the training's share;
- `partial_vs_whole`: the ratio of the two iteration times;
- `accuracy`: held-out greedy accuracy after the cold start and at the last iteration, per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from launch.bench_cycle import PHASES, later_iterations, read_rows, run_job
from launch.config_loading import load_config


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "partial", **record}), flush=True)


def summarize(name: str, rows: list[dict[str, float]]) -> float:
    """Emit one run's iteration and accuracy lines; returns its mean iteration seconds."""
    later = later_iterations(name, rows)
    means = {p: sum(r[f"time/{p}"] for r in later) / len(later) for p in PHASES}
    iteration = sum(means.values())
    _emit(run=name, measure="iteration", seconds=round(iteration, 3), iterations=len(later),
          rollout_seconds=round(means["rollout"], 3), train_seconds=round(means["train"], 3),
          partial_share=round(sum(r.get("rollout/partial_share", 0.0) for r in later) / len(later), 3))  # fmt: skip
    evaluated = [r for r in rows if "eval/accuracy" in r]
    _emit(run=name, measure="accuracy", first=evaluated[0]["eval/accuracy"], last=evaluated[-1]["eval/accuracy"])
    return iteration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench partial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs")
    args = ap.parse_args(argv)
    overrides = [f"run.iterations={args.iterations}", "run.eval_every=1000", *args.overrides]
    rollout = load_config(overrides).effective_rollout()
    if rollout.iteration_token_budget >= rollout.max_response_tokens:
        raise SystemExit(
            f"rollout.iteration_token_budget ({rollout.iteration_token_budget}) must be below "
            f"rollout.max_response_tokens ({rollout.max_response_tokens}) for partial rollouts to happen"
        )
    runs = {"partial": [], "whole": [f"rollout.iteration_token_budget={rollout.max_response_tokens}"]}
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="timeshare-bench-partial-") as tmp:
        for name, extra in runs.items():
            root = Path(tmp) / name
            root.mkdir()
            seconds[name] = summarize(name, read_rows(run_job(name, [*overrides, *extra], root)))
    _emit(measure="partial_vs_whole", ratio=round(seconds["partial"] / seconds["whole"], 3))
    return 0
