"""`timeshare bench sandbox`: what running a program under the code task's sandbox costs, and its throughput.

One JSON line per measure, all from this one invocation:
- `process`: the mean milliseconds of the same interpreter run on the same program without the
  sandbox (a plain subprocess), the floor a sandbox adds to;
- `program`: the mean milliseconds of one sandboxed run of a small program (`overhead_ms`: minus
  `process`: bwrap's namespaces and mounts, setpriv, the scratch directory);
- `throughput`: the example records' solutions scored as responses (every test case run) through
  the reward scorer with `reward.workers` = 1, 2, ...: programs and responses per second, and the
  ratio to one worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engine.rewards import RewardConfig, RewardScorer
from engine.tasks.code import CodeTask
from engine.tasks.sandbox import Sandbox, SandboxConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "engine/tasks/data/code_example.jsonl"
PROGRAM = "print(sum(range(1000)))"


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "sandbox", **record}), flush=True)


def _mean_ms(run: object, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()  # type: ignore[operator]
    return 1000 * (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench sandbox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=20, help="runs of the small program per measure")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reward.workers values to score with")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the example records per workers value")
    args = ap.parse_args(argv)

    plain = [sys.executable, "-I", "-c", PROGRAM]
    process_ms = _mean_ms(lambda: subprocess.run(plain, check=True, capture_output=True), args.repeats)
    _emit(measure="process", ms=round(process_ms, 2), repeats=args.repeats)
    sandbox = Sandbox(SandboxConfig())

    def sandboxed() -> None:
        result = sandbox.run(PROGRAM)
        if result.status != "ok":
            raise SystemExit(f"the sandbox failed the benchmark's program ({result.status}): {result.stderr}")

    program_ms = _mean_ms(sandboxed, args.repeats)
    _emit(measure="program", ms=round(program_ms, 2), overhead_ms=round(program_ms - process_ms, 2))

    task = CodeTask(path=str(EXAMPLES))
    samples = (task._records["train"] + task._records["heldout"]) * args.rounds
    pairs = [(s.demonstration, s) for s in samples]
    base = None
    for workers in args.workers:
        scorer = RewardScorer(RewardConfig(workers=workers), task)
        task.take_metrics()
        start = time.perf_counter()
        rewards = scorer.map(task.reward, pairs)
        seconds = time.perf_counter() - start
        programs = task.take_metrics()["reward/code/programs"]
        if sum(rewards) != len(pairs):
            raise SystemExit(f"workers={workers}: {len(pairs) - sum(rewards):.0f} example solutions failed their tests")
        rate = programs / seconds
        base = base or rate
        _emit(
            measure="throughput",
            workers=workers,
            programs=int(programs),
            responses=len(pairs),
            programs_per_s=round(rate, 2),
            responses_per_s=round(len(pairs) / seconds, 2),
            ratio_to_first=round(rate / base, 3),
        )
    return 0
