"""`timeshare filter` through vLLM on a locally made model: every record of the file scored k times,
the kept ones written back verbatim with their pass rate and difficulty, the summary consistent with
the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tiny_model import TinyModelSpec, write_tiny_model

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
K = 8


def test_filter_keeps_the_records_in_the_band_with_their_pass_rates(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(tokenizer="bpe", layers=2))
    records = [{"prompt": f"Name a digit (question {i}).", "answer": str(i % 10), "id": i} for i in range(40)]
    data = tmp_path / "digits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "kept.jsonl"
    cmd = [sys.executable, "-m", "launch.cli", "filter", str(model), str(out), "--k", str(K), "--low", "0.1"]
    overrides = ["task=jsonl", f"task.path={data}", "task.reward=exact", "rollout.temperature=1.5"]
    overrides += ["rollout.max_response_tokens=32", "rollout.max_model_len=256"]
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = [json.loads(line) for line in out.read_text().splitlines()]

    assert summary["prompts"] == 40
    assert sum(summary["pass_histogram"].values()) == 40
    in_band = sum(n for bin_, n in summary["pass_histogram"].items() if int(bin_.split("/")[0]) / K >= 0.1)
    assert summary["kept"] == len(kept) == in_band
    assert summary["mean_pass_rate"] > 0  # a random model at temperature 1.5 names some digit right
    by_id = {r["id"]: r for r in records}
    for record in kept:
        rate = record.pop("pass_rate")
        assert 0.1 <= rate <= 0.875
        assert (rate * K).is_integer()
        assert record.pop("difficulty") == 1.0 - rate  # the curriculum sampler's order: most solved first
        assert record == by_id[record["id"]]  # written back as it was read

    again = subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2
    assert "exists; name a new file" in again.stderr
