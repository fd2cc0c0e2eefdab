"""`task=gsm8k` and `task=math` through the real job (etcd, engine, Megatron ranks, vLLM) on the
project's example records in each dataset's format: prompts rendered through the BPE model's chat
template, the cold start on the worked solutions, every response scored by math-verify plus the
`think` format term, two iterations trained. The rewards the job logged are recomputed here from
the rollout's tokens, so a reward that never reached the verifier, or scored the wrong reference,
fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.rewards import RewardConfig, RewardScorer, RewardTerm
from engine.tasks.config import TaskConfig
from engine.tokenizer import load_tokens
from tests.integration.train_job import rescore_batch, rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "engine/tasks/data"
THINK_WEIGHT = 0.25


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_the_dataset_task_trains_on_verified_rewards(tmp_path: Path, name: str) -> None:
    path = EXAMPLES / f"{name}_example.jsonl"
    (tmp_path / "runs").mkdir()
    run = whole_run(
        tmp_path / "runs",
        "model.tokenizer=bpe",
        "task.chat_template=true",
        f"task={name}",
        f"task.path={path}",
        "task.pool_size=30",
        "task.heldout_size=2",
        "rollout.stop=''",
        "rollout.max_response_tokens=48",
        "rollout.iteration_token_budget=48",
        "rollout.max_model_len=256",
        "trainer.cold_start.epochs=20",
        f"reward.terms=[{{source: task}}, {{source: think, weight: {THINK_WEIGHT}}}]",
    )
    history = {int(r["iteration"]): r for r in rows(run)}
    for i in (0, 1):
        assert {"reward/term/task", "reward/term/think", "reward/correct"} <= set(history[i])
        # The cold start ended each worked solution with the end-of-sequence token: responses stop by themselves.
        assert history[i]["rollout/length_p50"] < 48
    assert "eval/accuracy" in history[2]  # held-out, after the last iteration

    task = TaskConfig(name=name, path=str(path), reward="exact").make()
    samples = {s.uid: s for split in ("train", "heldout") for s in task._records[split]}
    tokens = load_tokens(run.model_init, "", True, [])
    terms = (RewardTerm(source="task"), RewardTerm(source="think", weight=THINK_WEIGHT))
    scorer = RewardScorer(RewardConfig(terms=terms), task)
    for iteration in (0, 1):
        rescore_batch(run, iteration, scorer, samples, tokens)
