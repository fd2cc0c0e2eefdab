"""`timeshare bench push` runs end to end on small sizes and prints one JSON line per result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_push_prints_json_lines_with_same_run_baselines() -> None:
    cmd = [sys.executable, "-m", "launch.cli", "bench", "push", "--mib", "8", "--repeats", "1", "--skip", "vllm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {
        *("memcpy", "shm_push", "memcpy_fresh", "shm_push_fresh", "checksum"),
        *("mooncake_copy", "mooncake_tcp_pull"),
    }
    assert all(r["bench"] == "push" and r["bytes"] >= 8 << 20 and r["gb_per_s"] > 0 for r in rows)
    assert cases["shm_push"]["ratio_to_memcpy"] > 0
    assert cases["mooncake_tcp_pull"]["ratio_to_memcpy"] > 0
    assert not list(Path("/dev/shm").glob("timeshare-bench-*"))
