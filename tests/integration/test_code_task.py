"""`task=code` through the real job (etcd, engine, Megatron ranks, vLLM) on the project's example
records: prompts rendered through the BPE model's chat template, the cold start on the fenced
solutions, every response's program run under bubblewrap by two reward workers, two iterations
trained. The rewards the job logged are recomputed here from the rollout's tokens, and its outcome
counts add up to the responses it scored, so a reward that never ran the tests, or ran another
record's, fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.batch import load_batch
from engine.rewards import RewardConfig, RewardScorer
from engine.tasks.code import OUTCOMES
from engine.tasks.config import TaskConfig
from engine.tokenizer import load_tokens
from tests.integration.train_job import rescore_batch, rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "engine/tasks/data/code_example.jsonl"


def test_the_code_task_trains_on_sandboxed_test_results(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    run = whole_run(
        tmp_path / "runs",
        "model.tokenizer=bpe",
        "task.chat_template=true",
        "task=code",
        f"task.path={EXAMPLES}",
        "task.pool_size=30",
        "task.heldout_size=2",
        "task.sandbox.seconds=2",
        "reward.workers=2",
        "rollout.stop=''",
        "rollout.max_response_tokens=64",
        "rollout.iteration_token_budget=64",
        "rollout.max_model_len=256",
        "trainer.cold_start.epochs=60",
    )
    history = {int(r["iteration"]): r for r in rows(run)}
    task = TaskConfig(name="code", path=str(EXAMPLES), reward="exact").make()
    samples = {s.uid: s for split in ("train", "heldout") for s in task._records[split]}
    tokens = load_tokens(run.model_init, "", True, [])
    scorer = RewardScorer(RewardConfig(), task)
    ran = 0.0
    for iteration in (0, 1):
        batch = load_batch(run.batch(iteration))
        row = history[iteration]
        assert sum(row[f"reward/code/{o}"] for o in OUTCOMES) == batch.size  # one outcome per response
        assert row["reward/code/bad_records"] == 0
        ran += row["reward/code/programs"]
        rescore_batch(run, iteration, scorer, samples, tokens)
    assert ran > 0  # the cold start taught fenced programs: some responses were run
    assert "eval/accuracy" in history[2]
    assert "eval/code/programs" in history[2]
