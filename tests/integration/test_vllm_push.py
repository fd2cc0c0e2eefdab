"""vLLM started with dummy weights receives the real ones through shared memory and then generates
exactly what HF transformers generates greedily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from checkpoint_engine.contracts.weight_region import list_regions, remove_region, write_region
from engine.tiny_model import TinyModelSpec, write_tiny_model
from sidecars.megatron.model import read_hf_tensors
from tests.integration.hf_reference import hf_greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12


def run_vllm_driver(model_dir: Path, manifest: Path | None, prompts: list[list[int]], out: Path) -> dict:
    """vllm_push_driver.py's greedy tokens; without a manifest, vLLM serves the directory's own weights."""
    weights = ["--manifest", str(manifest)] if manifest is not None else ["--load-format", "auto"]
    cmd = [
        sys.executable,
        str(REPO / "tests/integration/vllm_push_driver.py"),
        "--model",
        str(model_dir),
        *weights,
        "--prompts",
        json.dumps(prompts),
        "--max-tokens",
        str(MAX_TOKENS),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "family",
    [{"arch": "llama"}, {"arch": "qwen3"}, {"arch": "llama", "rope_scaling": "llama3"}, {"arch": "qwen3_moe"}],
    ids=["llama", "qwen3", "llama3-scaled", "qwen3-moe"],
)
def test_dummy_vllm_matches_hf_after_shm_push(tmp_path: Path, family: dict) -> None:
    from transformers import AutoTokenizer

    spec = TinyModelSpec(layers=2, hidden=128, heads=4, kv_heads=2, **family)
    model_dir = write_tiny_model(tmp_path / "model", spec)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t)["input_ids"] for t in ("12+34=", "sort:3,1,2=", "hello world")]
    region = f"timeshare-test-{uuid.uuid4().hex[:8]}"
    manifest = write_region(region, 5, read_hf_tensors(model_dir))
    try:
        (tmp_path / "manifest.json").write_text(json.dumps(manifest.to_dict()))
        result = run_vllm_driver(model_dir, tmp_path / "manifest.json", prompts, tmp_path / "out.json")
    finally:
        remove_region(region)

    want = hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert result["versions"] == [5]
    assert result["before"] != want, "dummy weights already produced the real model's output"
    assert result["after"] == want
    assert region not in list_regions()


@pytest.mark.parametrize(("arch", "tp", "ep"), [("qwen2", 2, 1), ("qwen3_moe", 1, 2)], ids=["tp2", "ep2"])
def test_megatron_export_over_two_ranks_loads_into_vllm_tp1(tmp_path: Path, arch: str, tp: int, ep: int) -> None:
    """The EXPORT path across parallel layouts: Megatron at TP=2 (or an MoE at EP=2) gathers full HF
    tensors into shm; vLLM at TP=1 loads them and generates what HF generates."""
    from tests.integration.test_megatron import _randomised_model, _run_megatron

    spec = TinyModelSpec(arch=arch, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=192)
    model_dir = _randomised_model(tmp_path / "model", spec)
    torch.save(torch.zeros(1, 4, dtype=torch.long), tmp_path / "tokens.pt")
    region = f"timeshare-test-{uuid.uuid4().hex[:8]}"
    prompts = [[1, 20, 21, 22], [1, 30, 31]]
    try:
        _run_megatron(model_dir, tmp_path, tp=tp, nproc=2, extra=["--ep", str(ep), "--region", region])
        result = run_vllm_driver(model_dir, tmp_path / "manifest.json", prompts, tmp_path / "out.json")
    finally:
        remove_region(region)
    assert result["after"] == hf_greedy(model_dir, prompts, MAX_TOKENS)
