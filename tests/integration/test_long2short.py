"""Kimi's long2short through the real job: a run with `reward=long2short` (the length term from the
first iteration), `timeshare long2short shortest` on its final model (k responses per prompt through
vLLM, the shortest passing one kept), a second run cold-started on those records
(`trainer.cold_start.data`), and `timeshare long2short merge` of the run's final and initial models,
which transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.tasks.config import TaskConfig
from engine.tokenizer import load_tokens
from tests.integration.train_job import rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.extended]
REPO = Path(__file__).resolve().parents[2]
TASK = ["task=scratchpad", "task.digits=2", "task.pool_size=400", "trainer.cold_start.epochs=40"]
TASK += ["rollout.max_response_tokens=32", "rollout.iteration_token_budget=32"]


def timeshare(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_long2short_rl_shortest_responses_as_a_cold_start_and_a_merge(tmp_path: Path) -> None:
    (tmp_path / "long").mkdir()
    run = whole_run(tmp_path / "long", *TASK, "reward=long2short", "run.iterations=1")
    first = rows(run)[0]
    assert first["reward/term/length"] != 0.0  # at full weight from iteration 0 (reward=kimi waits 4 iterations)

    out = tmp_path / "shortest.jsonl"
    summary = timeshare("long2short", "shortest", str(run.root), str(out), "--k", "4", "--prompts", "24")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == 24
    assert summary["kept"] == len(records) > 0
    assert summary["mean_tokens_kept"] <= summary["mean_tokens_correct"]
    task = TaskConfig(name="scratchpad", digits=2).make()
    pool = {s.prompt: s for s in task.samples("train", 400, 0)}
    for r in records:
        assert task.reward(r["response"], pool[r["prompt"]]) == 1.0  # a passing response to a prompt of the pool
        assert 1 <= r["passed"] <= 4

    (tmp_path / "short").mkdir()
    second = whole_run(tmp_path / "short", *TASK, f"trainer.cold_start.data={out}", "run.iterations=1")
    tokens = load_tokens(second.model_init, "\n", False, [])
    examples = json.loads(second.cold_start.read_text())
    assert examples == [[tokens.encode(r["prompt"]), tokens.encode_response(r["response"] + "\n")] for r in records]

    merged = tmp_path / "merged"
    summary = timeshare("long2short", "merge", str(run.root), str(run.model_init), str(merged), "--weight", "0.25")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final, init, mixed = (load_file(str(d / "model.safetensors")) for d in (run.root / "hf", run.model_init, merged))
    assert summary["tensors"] == len(mixed) == len(final)
    for name, x in mixed.items():
        torch.testing.assert_close(x, 0.25 * final[name] + 0.75 * init[name])
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
