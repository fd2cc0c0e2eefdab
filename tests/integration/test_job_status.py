"""`timeshare status` reads a job from a real etcd: phase, leader, leases, each node's vLLM and phase times."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.job_status import NoSuchJob, format_status, read_status
from launch.etcd_server import LocalEtcd

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
JOB = "status-job"
PAYLOADS = {
    Phase.TRAIN: {"metrics": {"train/seconds": 4.5}},
    Phase.START_VLLM: {"pid": 11, "seconds": 1.0},
    Phase.UPDATE_WEIGHTS: {"weight_version": 1, "load_seconds": 0.1},
    Phase.TERMINATE_VLLM: {"pids": [11], "rss_freed_bytes": 0, "killed": True},
}


def _iteration(nodes: list[Coordinator], iteration: int, until: Phase) -> None:
    """Every node acks each phase of `iteration` up to and including `until`, 10 ms apart."""
    for phase in CYCLE[: CYCLE.index(until) + 1]:
        for c in nodes:
            c.ack(PhaseState(iteration=iteration, phase=phase, weight_version=iteration), PAYLOADS.get(phase))
        time.sleep(0.01)


def test_status_shows_phase_leader_leases_vllms_and_phase_times(etcd_server: LocalEtcd) -> None:
    node0 = Coordinator(etcd_server.endpoint, JOB, "node0", ttl=2)
    node1 = Coordinator(etcd_server.endpoint, JOB, "node1", ttl=2)
    try:
        assert node0.campaign()
        node0.init_phase(PhaseState(iteration=2, phase=Phase.UPDATE_WEIGHTS, weight_version=2))
        _iteration([node0, node1], 1, Phase.ONLOAD)
        _iteration([node0], 2, Phase.START_VLLM)  # node0 has started iteration 2's vLLM
        node0.ack(PhaseState(2, Phase.UPDATE_WEIGHTS, 2), error="vLLM refused the weights")
        node1.close()  # its lease is revoked: a node that is gone
        with connect(etcd_server.endpoint) as client:
            status = read_status(client, JOB)
            with pytest.raises(NoSuchJob, match=r"no job 'other' in etcd; jobs there: \['status-job'\]"):
                read_status(client, "other")
    finally:
        node0.close()
        node1.close()
    assert (status.phase.iteration, status.phase.phase, status.leader) == (2, Phase.UPDATE_WEIGHTS, "node0")
    views = {n.node: n for n in status.nodes}
    assert (views["node0"].lease, views["node0"].vllm, views["node0"].weight_version) == (True, "started", 1)
    assert views["node0"].error == "vLLM refused the weights"
    assert (views["node1"].lease, views["node1"].vllm, views["node1"].weight_version) == (False, "terminated", 1)
    assert status.last_iteration == 1
    assert list(status.phase_seconds) == [p.value.lower() for p in CYCLE]
    assert status.phase_seconds["train"] == 4.5  # iteration 0 has no acks: the trainer's own report
    assert all(0 <= t < 5 for t in status.phase_seconds.values())
    text = format_status(status)
    assert text.splitlines()[0].startswith("job status-job: UPDATE_WEIGHTS of iteration 2 (weight version 2) for ")
    assert "node1  lost" in text
    assert text.splitlines()[-1].startswith("iteration 1: train 4.5s offload ")


def test_the_cli_names_what_is_missing(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launch.cli", "status", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    with Coordinator(etcd_server.endpoint, JOB, "node0", ttl=2) as node0:
        assert node0.campaign()
        node0.init_phase(PhaseState(iteration=0, phase=Phase.EXPORT, weight_version=0))
        shown = status("--etcd", etcd_server.endpoint, "--job", JOB)
        listed = status("--etcd", etcd_server.endpoint)
        missing = status("--etcd", etcd_server.endpoint, "--job", "nope")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"job {JOB}: EXPORT of iteration 0")
    assert listed.stdout.strip() == JOB
    assert missing.returncode == 2
    assert "no job 'nope' in etcd" in missing.stderr
    gone = status("--etcd", "127.0.0.1:1", "--job", JOB)
    assert (gone.returncode, gone.stderr.strip()) == (2, "timeshare status: error: etcd at 127.0.0.1:1 did not answer")
    assert "not a run directory" in status(str(tmp_path)).stderr
