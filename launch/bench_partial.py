"""`timeshare bench partial`: what partial rollouts save on a long-tailed task, at equal prompts per iteration.

Runs the real job twice on the same configuration (the default task unless overridden): with partial
rollouts (`rollout.iteration_token_budget` below `max_response_tokens`: long answers stop at the
budget and continue next iteration from the replay buffer) and without (the budget raised to the cap:
every answer is generated whole within its iteration). One JSON line per measure, from this one
invocation:
- `iteration`: mean seconds per iteration after the first, with the rollout's and the training's share;
- `partial_vs_whole`: the ratio of the two iteration times, and of their rollouts';
- `accuracy`: held-out greedy accuracy after the cold start and at the last iteration, per run;
- `decode_scaling`: vLLM's seconds per decode step and per token as the batch grows to a rollout's trajectories,
  on the run's model. Partial rollouts save the time a batch waits for its longest trajectories, which is
  there while a step costs the same at any batch (a GPU's memory-bound decode). Where a step's time grows with
  the batch (compute-bound), a rollout's time follows its tokens, which partial rollouts do not reduce.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from launch.bench_cycle import PHASES, later_iterations, read_rows, run_job
from launch.config_loading import load_config
from launch.train_config import TrainConfig


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "partial", **record}), flush=True)


def summarize(name: str, rows: list[dict[str, float]]) -> tuple[float, float]:
    """Emit one run's iteration and accuracy lines; returns its mean iteration and rollout seconds."""
    later = later_iterations(name, rows)
    means = {p: sum(r[f"time/{p}"] for r in later) / len(later) for p in PHASES}
    iteration = sum(means.values())
    _emit(
        run=name,
        measure="iteration",
        seconds=round(iteration, 3),
        iterations=len(later),
        rollout_seconds=round(means["rollout"], 3),
        train_seconds=round(means["train"], 3),
        partial_share=round(sum(r.get("rollout/partial_share", 0.0) for r in later) / len(later), 3),
    )
    evaluated = [r for r in rows if "eval/accuracy" in r]
    _emit(run=name, measure="accuracy", first=evaluated[0]["eval/accuracy"], last=evaluated[-1]["eval/accuracy"])
    return iteration, means["rollout"]


def decode_scaling(cfg: TrainConfig, steps: int = 32) -> None:
    """One `decode_scaling` line per batch, from one trajectory to a rollout's (prompts x group size): vLLM (in
    this process, tensor parallel 1) generating `steps` tokens for each of `batch` prompts."""
    from vllm import SamplingParams, TokensPrompt

    from engine.tiny_model import write_tiny_model
    from sidecars.vllm.llm import start_llm

    rollout = cfg.effective_rollout()
    widest = rollout.prompts_per_iteration * rollout.group_size
    with tempfile.TemporaryDirectory(prefix="timeshare-bench-decode-") as tmp:
        model_dir = cfg.model.path or write_tiny_model(Path(tmp) / "model", cfg.model.tiny_spec(seed=cfg.run.seed))
        settings = cfg.vllm_settings(model_dir, port=1)  # in this process: the port is not opened
        llm = start_llm(settings.model_copy(update={"tensor_parallel": 1}))
        params = SamplingParams(max_tokens=steps, ignore_eos=True, seed=cfg.run.seed)
        prompts = [TokensPrompt(prompt_token_ids=[1 + k % 7, 2, 3]) for k in range(widest)]
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        for batch in [*(b for b in (1, 16, 128, 512) if b < widest), widest]:
            start = time.perf_counter()
            llm.generate(prompts[:batch], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            _emit(
                measure="decode_scaling",
                batch=batch,
                step_ms=round(1e3 * seconds / steps, 2),
                token_us=round(1e6 * seconds / (steps * batch), 1),
            )


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
    (iteration, rollout), (whole_iteration, whole_rollout) = seconds["partial"], seconds["whole"]
    _emit(
        measure="partial_vs_whole",
        ratio=round(iteration / whole_iteration, 3),
        rollout_ratio=round(rollout / whole_rollout, 3),
    )
    decode_scaling(load_config(overrides))
    return 0
