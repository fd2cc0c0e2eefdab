"""The trainer rank's model work on real Megatron (gloo, CPU): cold start, RL steps, offload/onload, export.

TP=1 and TP=2 start from the same weights and take the same steps, so their losses and global
gradient norms must agree to float precision: that checks vocab-parallel logprobs and the norm
over sharded parameters. So must a Qwen3-MoE on one rank and on two (EP 2, each rank with its own
groups of the batch, the second one fewer): that checks the expert gradients and norms, and that
ranks with rows of other shapes, or out of groups, still meet in the experts' collectives.
Adam turns float noise in near-zero gradients into lr-sized steps, so the weights themselves are
only compared loosely.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.tiny_model import TinyModelSpec, write_tiny_model

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _run(model: Path, out: Path, tp: int, ep: int = 1) -> dict:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={tp * ep}",
        str(REPO / "tests/integration/trainer_driver.py"),
        "--model",
        str(model),
        "--out",
        str(out),
        "--tp",
        str(tp),
        "--ep",
        str(ep),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("trainer")
    model = write_tiny_model(root / "model", TinyModelSpec(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256))
    return {tp: (_run(model, root / f"tp{tp}", tp), root / f"tp{tp}") for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_cold_start_learns_and_rl_steps_run(runs: dict, tp: int) -> None:
    results, _ = runs[tp]
    losses = results["sft_losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    for step in ("train", "second_step"):
        metrics = results[step]
        assert torch.isfinite(torch.tensor([metrics["train/loss"], metrics["train/grad_norm"]])).all()
        assert metrics["train/tokens"] == 3 * 4 * 6
    # With a target loss the same cold start stops after the first epoch that reaches it (the second).
    assert results["sft_to_target"] == pytest.approx(losses[:2], rel=1e-6)
    # The batch's rollout logprobs are the trainer's own: the gap is float noise only.
    assert results["train"]["logprob_gap/mean_abs"] < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_rows_give_the_padded_logprobs_and_gradients(runs: dict, tp: int) -> None:
    differences = runs[tp][0]["packing"]
    assert differences["rows_packed"] < 8  # eight trajectories of 6..14 tokens in fewer rows of 14
    assert differences["logp"] < 1e-5
    assert differences["grad"] < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_ppo_trains_its_value_head_with_the_policy(runs: dict, tp: int) -> None:
    first, second = runs[tp][0]["ppo"]
    assert first["train/value_mean"] == 0.0  # the head starts at zero
    assert first["train/value_loss"] > 0
    assert second["train/value_mean"] != 0.0  # the first step moved it toward the returns
    assert all(torch.isfinite(torch.tensor([s["train/loss"], s["train/grad_norm"]])).all() for s in (first, second))


@pytest.mark.parametrize("tp", [1, 2])
def test_offload_keeps_every_weight(runs: dict, tp: int) -> None:
    results, _ = runs[tp]
    assert results["params_empty_while_offloaded"]
    assert results["export_equal_while_offloaded"]
    assert results["export_equal_after_onload"]
    assert results["optimizer_equal_after_onload"]  # Adam's moments and step, bit for bit
    assert results["offload"]["bytes_moved"] > 0


def test_tensor_parallel_step_equals_single_rank(runs: dict) -> None:
    r1, r2 = runs[1][0], runs[2][0]
    assert r1["sft_losses"] == pytest.approx(r2["sft_losses"], rel=1e-5)
    for step in ("train", "second_step"):
        for key in ("train/loss", "train/grad_norm"):
            assert r1[step][key] == pytest.approx(r2[step][key], rel=1e-4), (step, key)
    for one, two in zip(r1["ppo"], r2["ppo"], strict=True):
        for key in ("train/loss", "train/value_loss", "train/grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-4), key
    one = load_file(str(runs[1][1] / "after_step.safetensors"))
    two = load_file(str(runs[2][1] / "after_step.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 5e-3


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("trainer-moe")
    spec = TinyModelSpec(arch="qwen3_moe", layers=2, hidden=128, heads=4, kv_heads=2, expert_intermediate=64)
    model = write_tiny_model(root / "model", spec)
    return {ep: (_run(model, root / f"ep{ep}", tp=1, ep=ep), root / f"ep{ep}") for ep in (1, 2)}


def test_expert_parallel_step_equals_single_rank(moe_runs: dict) -> None:
    r1, r2 = moe_runs[1][0], moe_runs[2][0]
    assert torch.tensor(r1["uneven_logp"]).allclose(torch.tensor(r2["uneven_logp"]), atol=1e-5)
    assert r1["sft_losses"] == pytest.approx(r2["sft_losses"], rel=1e-5)
    assert r2["sft_losses"][-1] < 0.6 * r2["sft_losses"][0]
    for step in ("train", "second_step"):
        for key in ("train/loss", "train/grad_norm", "logprob_gap/max_abs"):
            assert r1[step][key] == pytest.approx(r2[step][key], rel=1e-4, abs=1e-6), (step, key)
    for one, two in zip(r1["ppo"], r2["ppo"], strict=True):
        for key in ("train/loss", "train/value_loss", "train/grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-4), key
    assert r2["export_equal_while_offloaded"]
    assert r2["export_equal_after_onload"]
    one = load_file(str(moe_runs[1][1] / "after_step.safetensors"))
    two = load_file(str(moe_runs[2][1] / "after_step.safetensors"))
    assert one.keys() == two.keys()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in two
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 5e-3
