"""`timeshare train cluster=local2`: two nodes on this machine, node1 in a network namespace of its own.

Each node runs its engine, its vLLM and its trainer rank (data parallel across the nodes); the head's
trainer writes each version, node1's engine pulls it through Mooncake over the veth pair, and the
controller spreads every rollout over both vLLMs. Checked per iteration: both vLLMs serve the version
the trainer exported, with equal checksums (each verified on load); both served rollouts; the trainer's
logprobs of every sampled token agree with the vLLM that sampled it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.train_job import rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVES = re.compile(r"vLLM serves weight version (\d+) \(checksums verified, digest (\w+)\)")


def _served(log: Path) -> dict[int, str]:
    return {int(v): d for v, d in SERVES.findall(log.read_text())}


def test_two_nodes_train_one_model_and_both_roll_out(tmp_path: Path) -> None:
    paths = whole_run(tmp_path, "cluster=local2")
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert sorted(history) == [0, 1, 2]
    for i, row in history.items():
        assert row["vllm/weight_version/node0"] == row["vllm/weight_version/node1"] == i
        assert row["rollout/requests/node0"] > 0
        assert row["rollout/requests/node1"] > 0
    assert max(r["logprob_gap/mean_abs"] for r in history.values() if "logprob_gap/mean_abs" in r) < 1e-3

    logs = paths.logs
    assert _served(logs / "engine-node0.log") == _served(logs / "engine-node1.log")  # bit-identical weights
    assert sorted(_served(logs / "engine-node1.log")) == [0, 1, 2]
    pulled = re.findall(r"pulled weight version (\d+) from node0", (logs / "engine-node1.log").read_text())
    assert [int(v) for v in pulled] == [0, 1, 2]  # through Mooncake, not shared memory
    assert (logs / "trainer-node1.log").read_text().count("[node1 rank1]") > 0  # node1's rank trained

    node0, node1 = (json.loads((paths.root / f"engine-{n}.json").read_text()) for n in ("node0", "node1"))
    if os.geteuid() == 0:  # as root node1 lives in a network namespace, at an address of its own
        assert node1["host"].startswith("10.231.")
        assert node0["host"] != node1["host"]
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert "timeshare-" not in namespaces
