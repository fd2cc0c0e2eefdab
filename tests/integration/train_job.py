"""`timeshare train` as a test starts it: the small configuration, the launcher in a subprocess, its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from checkpoint_engine.contracts.run_dir import RunPaths
from engine.batch import load_batch
from engine.rewards import RewardScorer
from engine.tasks import Sample
from engine.tokenizer import Tokens

REPO = Path(__file__).resolve().parents[2]
ITERATIONS, PROMPTS, SEED, POOL = 3, 6, 0, 120
# The short-answer task, and a budget equal to the cap: every trajectory finishes within its iteration,
# so each batch holds the prompts sampled for it.
OVERRIDES = [
    "task=addition",
    "model.layers=2",
    "rollout.max_response_tokens=16",
    "rollout.iteration_token_budget=16",
    f"run.iterations={ITERATIONS}",
    "run.eval_every=2",
    "run.progress=false",
    f"run.seed={SEED}",
    f"task.pool_size={POOL}",
    "task.heldout_size=16",
    f"rollout.prompts_per_iteration={PROMPTS}",
    "rollout.group_size=4",
    "rollout.eval_samples=2",
    "trainer.cold_start.epochs=2",
]
# Scratchpad answers with a carry are longer than a budget of 16 tokens: they continue in the next
# iteration. The cold start is long enough to learn the format, so short answers stop within the budget.
PARTIAL = [
    "task=scratchpad",
    "task.digits=2",
    "task.pool_size=400",
    "trainer.cold_start.epochs=40",
    "rollout.max_response_tokens=32",
    "rollout.iteration_token_budget=16",
]


def launch(args: list[str], log: Path, **popen: object) -> subprocess.Popen:
    """`timeshare train ARGS` with its output appended to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *args],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        **popen,
    )


def wait_for(path_glob: Path, proc: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(path_glob.parent.glob(path_glob.name)) if path_glob.parent.exists() else []
        if found:
            return found[0]
        assert proc.poll() is None, f"timeshare train exited early with {proc.returncode}"
        time.sleep(0.1)
    raise AssertionError(f"{path_glob} did not appear within {timeout} s")


def await_exit(proc: subprocess.Popen, log: Path, status: int = 0, timeout: float = 600) -> None:
    """The launcher exits with `status` within `timeout` s; killed otherwise."""
    try:
        assert proc.wait(timeout) == status, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rows(paths: RunPaths) -> list[dict[str, float]]:
    return [json.loads(line) for line in (paths.root / "metrics.jsonl").read_text().splitlines()]


def whole_run(root: Path, *overrides: str) -> RunPaths:
    """A whole run of the small configuration with `overrides` (two iterations unless they say otherwise)
    under `root`, which holds nothing else; its run directory."""
    log = root / "launcher.log"
    await_exit(launch([*OVERRIDES, f"run.root={root}", "run.iterations=2", *overrides], log), log)
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return RunPaths(run_dir)


def export_reproduces_rollout(run: RunPaths, version: int, out: Path):  # -> the exported transformers model
    """`timeshare export` of checkpoint `version` (its weights sampled rollout `version`); transformers
    gives the tokens vLLM sampled with them the logprobs vLLM reported."""
    import torch
    from transformers import AutoModelForCausalLM

    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "export", str(run.root), str(out), "--iteration", str(version)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = load_batch(run.batch(version))
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.input_ids).logits[:, :-1], dim=-1)  # the rollout's temperature is 1
    taken = logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    response = batch.versions == version
    assert response.sum() > 0
    assert (taken - batch.rollout_logp)[response].abs().max() < 1e-3
    return model


def rescore_batch(
    run: RunPaths, iteration: int, scorer: RewardScorer, samples: dict[str, Sample], tokens: Tokens
) -> None:
    """Rollout batch `iteration` scored again here from its tokens with `scorer` (the job's reward
    config and task) equals the rewards the job stored; each row starts with its sample's prompt as
    `tokens` encodes it (templated)."""
    import torch

    batch = load_batch(run.batch(iteration))
    recomputed = []
    for row in range(batch.size):
        sample = samples[batch.prompt_uids[row]]
        prompt = tokens.encode(sample.prompt)
        assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        response = batch.input_ids[row, 1:][batch.loss_mask[row] > 0]
        finish = "stop" if response[-1].item() in tokens.stop_ids else "length"
        text = tokens.decode(response.tolist())
        recomputed.append(scorer.score_group([text], sample, [finish], [len(response)], iteration).totals[0])
    assert torch.allclose(batch.rewards, torch.tensor(recomputed, dtype=batch.rewards.dtype)), iteration
