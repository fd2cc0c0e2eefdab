"""The two debug modes, each a whole job through every phase: `run.mode=rollout_only` rolls out the starting
model every iteration and learns nothing; `run.mode=train_only` then trains on the batches that run saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint_engine.contracts.run_dir import RunPaths
from engine.batch import load_batch
from tests.integration.train_job import rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# The length reward from iteration 0 separates a group's samples even when no answer is right yet: the batches
# carry advantages that move the weights when trained on.
LENGTH = ["reward=kimi", "reward.length.warmup_iterations=0", "reward.length.ramp_iterations=0"]


def _weights(paths: RunPaths, checkpoint: int) -> dict[str, torch.Tensor]:
    model = torch.load(paths.trainer_state(checkpoint, 0), weights_only=False)["model"]
    return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollout_only_serves_the_starting_model_and_train_only_trains_on_its_batches(tmp_path: Path) -> None:
    (tmp_path / "rollout").mkdir()
    rolled = whole_run(tmp_path / "rollout", "run.mode=rollout_only", *LENGTH)
    history = rows(rolled)
    assert [r["rollout/weight_version"] for r in history[:2]] == [0, 1]  # each version rolled out and served
    assert not [r for r in history if "train/loss" in r], "rollout_only trained"
    groups = [load_batch(rolled.batch(v)).rewards.view(-1, 4) for v in (0, 1)]  # rollout.group_size=4
    assert any(bool((g.max(dim=1).values > g.min(dim=1).values).any()) for g in groups), "nothing to learn from"
    assert _same(_weights(rolled, 1), _weights(rolled, 2))

    (tmp_path / "train").mkdir()
    trained = whole_run(tmp_path / "train", "run.mode=train_only", f"run.batches_from={rolled.root}", *LENGTH)
    history = rows(trained)
    for version in (0, 1):
        theirs, ours = load_batch(rolled.batch(version)), load_batch(trained.batch(version))
        assert torch.equal(theirs.input_ids, ours.input_ids)
        assert theirs.prompt_uids == ours.prompt_uids
        assert history[version]["reward/mean"] == pytest.approx(float(theirs.rewards.mean()))
    assert not [r for r in history if "rollout/tokens_per_second" in r], "train_only generated"
    assert [int(r["iteration"]) for r in history if "train/loss" in r] == [1, 2]
    assert "eval/accuracy" in history[0]  # vLLM still serves each version, for the held-out evaluation
    assert not _same(_weights(trained, 1), _weights(trained, 2))
