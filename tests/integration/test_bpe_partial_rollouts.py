"""Partial rollouts with a byte-level BPE tokenizer and a chat template continue by token ids: a
trajectory continued through the replay buffer over three versions is the one generated whole
(greedy, the same vLLM), while decoding and encoding its text again would change its ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tiny_model import TinyModelSpec, write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["12+34=", "sort: 9,3,5,1 ->", "Add 407 and 96, column by column."]


def test_a_trajectory_continued_over_three_versions_equals_the_whole_generation(tmp_path: Path) -> None:
    spec = TinyModelSpec(arch="qwen3", tokenizer="bpe", layers=2, hidden=128, heads=4, kv_heads=2)
    model_dir = write_tiny_model(tmp_path / "model", spec)
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        str(REPO / "tests/integration/partial_bpe_driver.py"),
        "--model",
        str(model_dir),
        "--prompts",
        json.dumps(PROMPTS),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())

    assert result["versions"] == [[v for v in range(3) for _ in range(8)]] * len(PROMPTS)
    assert result["continued"] == result["whole"]
    # Random weights write arbitrary token sequences, which a BPE encodes back otherwise.
    assert any(r != f for r, f in zip(result["retokenised"], result["first"], strict=True))
