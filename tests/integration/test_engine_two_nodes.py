"""Two checkpoint engines (real `timeshare engine` processes) on one etcd drive a full iteration:
leader election, phase advance with acks, weights pushed through shared memory on node0 and
pulled through Mooncake tcp on node1, generation equal to HF on both, vLLM killed and restarted
on request, a killed engine noticed within its lease TTL, stale regions cleaned at restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from checkpoint_engine.config import EngineConfig, PhaseConfig, TransferConfig
from checkpoint_engine.contracts.acks import ExportAck, MetricsAck, MoveAck
from checkpoint_engine.contracts.phases import Phase
from checkpoint_engine.contracts.vllm_client import VllmClient
from checkpoint_engine.contracts.vllm_protocol import GenerationRequest, VllmSettings
from checkpoint_engine.contracts.weight_region import list_regions, region_name, write_region
from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.etcd_server import LocalEtcd, free_loopback_ports
from sidecars.megatron.model import read_hf_tensors
from tests.integration.hf_reference import hf_greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
JOB = "t2n"
TTL = 3
PROMPTS = [[1, 20, 21, 22], [1, 30, 31]]


def _engine(
    node: str, etcd: str, model: Path, run: Path, ports: tuple[int, int], weights_from: tuple[str, ...]
) -> subprocess.Popen:
    cfg = EngineConfig(
        node=node,
        job=JOB,
        etcd=etcd,
        nodes=("node0", "node1"),
        weights_from=weights_from,
        log_dir=str(run),
        port=ports[0],
        lifecycle="terminate",
        phase=PhaseConfig(timeout=300.0, ttl=TTL),
        transfer=TransferConfig(kind="mooncake"),
        vllm=VllmSettings(
            model_dir=str(model),
            port=ports[1],
            tensor_parallel=1,
            gpu_memory_utilization=0.15,
            max_model_len=512,
            dtype="float32",
            seed=0,
        ),
    )
    cmd = [sys.executable, "-m", "launch.cli", "engine", str(cfg.to_json_file(run / f"engine-{node}.json"))]
    log = open(run / f"engine-{node}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


class Node:
    def __init__(self, name: str, port: int, vllm_port: int) -> None:
        self.name, self.url, self.vllm = name, f"http://127.0.0.1:{port}", VllmClient(f"http://127.0.0.1:{vllm_port}")

    def get(self, path: str) -> dict:
        r = requests.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict | None = None) -> dict:
        r = requests.post(self.url + path, json=body or {}, timeout=300)
        assert r.status_code == 200, f"{self.name} {path}: {r.status_code} {r.text}"
        return r.json()

    def phase(self) -> tuple[int, str] | None:
        p = self.get("/status")["phase"]
        return None if p is None else (p["iteration"], p["phase"])


def _wait(what: str, fn, timeout: float = 240.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _greedy(node: Node, n: int) -> list[list[int]]:
    reqs = [GenerationRequest(prompt_ids=p, max_tokens=n, temperature=0.0, ignore_eos=True) for p in PROMPTS]
    return [r.samples[0].token_ids for r in node.vllm.generate(reqs).results]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_engines_one_iteration(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(layers=2, hidden=128, heads=4))
    want = hf_greedy(model, PROMPTS, 8)
    p0, v0, p1, v1 = free_loopback_ports(4)
    nodes = [Node("node0", p0, v0), Node("node1", p1, v1)]
    procs: dict[str, subprocess.Popen] = {}
    with LocalEtcd(tmp_path / "etcd") as etcd:
        try:
            procs["node0"] = _engine("node0", etcd.endpoint, model, tmp_path, (p0, v0), ())
            procs["node1"] = _engine("node1", etcd.endpoint, model, tmp_path, (p1, v1), ("node0",))
            n0, n1 = nodes
            # Leader election: both agree on one leader, and the job starts at EXPORT of iteration 0.
            leader = _wait("a leader", lambda: n0.get("/status")["leader"])
            assert leader in ("node0", "node1")
            # node1 started second: its API may answer later than node0's
            assert _wait("node1's view of the leader", lambda: n1.get("/status")["leader"]) == leader
            assert _wait("phase", n0.phase) == (0, "EXPORT")

            # EXPORT: node0's producer writes version 0 into its region and registers it.
            manifest = write_region(region_name(JOB, "node0", 0), 0, read_hf_tensors(model))
            n0.post(
                "/weights/register", {"manifest": manifest.to_dict(), "payload": ExportAck(weight_version=0).to_dict()}
            )

            # START_VLLM and UPDATE_WEIGHTS happen by themselves on both nodes (node1 pulls over Mooncake).
            _wait("ROLLOUT", lambda: n0.phase() == (0, "ROLLOUT"), timeout=400)
            for n in nodes:
                status = n.get("/status")
                assert status["vllm_alive"], n.name
                assert status["vllm_weight_version"] == 0, n.name
                assert _greedy(n, 8) == want, n.name
            assert any(r.endswith("-v0-pulled") for r in list_regions(f"timeshare-{JOB}-node1-"))

            # vLLM killed mid-rollout on node0: the engine reports it and restarts it on request, with the
            # version the ROLLOUT serves (the only way in besides the phase machine).
            os.kill(n0.get("/status")["vllm_pid"], signal.SIGKILL)
            _wait("node0 to notice vLLM died", lambda: not n0.get("/status")["vllm_alive"], timeout=30)
            with pytest.raises(AssertionError, match=r"409.*restarted only during ROLLOUT of version 1"):
                n0.post("/vllm/restart", {"version": 1})
            assert n0.post("/vllm/restart", {"version": 0})["weight_version"] == 0
            assert n0.get("/status")["vllm_restarts"] == 1
            assert _greedy(n0, 8) == want

            # The controller (on the head, node0) finishes ROLLOUT; vLLM is killed on both nodes; then ONLOAD...
            rollout = MetricsAck(metrics={"reward/mean": 0.5}).to_dict()
            n0.post("/phase/complete", {"iteration": 0, "phase": "ROLLOUT", "payload": rollout})
            _wait("ONLOAD", lambda: n0.phase() == (0, "ONLOAD"), timeout=120)
            assert not any(n.get("/status")["vllm_alive"] for n in nodes)
            assert all(n.get("/status")["vllm_zygote"] for n in nodes)  # the next start forks, with imports done
            with pytest.raises(AssertionError, match="409"):  # a phase that is not current is refused
                n0.post("/phase/complete", {"iteration": 0, "phase": "TRAIN", "payload": MetricsAck().to_dict()})
            for n in nodes:
                n.post(
                    "/phase/complete", {"iteration": 0, "phase": "ONLOAD", "payload": MoveAck(seconds=0.0).to_dict()}
                )
            assert _wait("TRAIN 1", lambda: n0.phase() == (1, Phase.TRAIN.value))

            # A killed engine's lease expires within its TTL and the survivor sees it.
            gone_at = time.monotonic()
            procs["node1"].kill()
            procs["node1"].wait()
            _wait("node1 to expire", lambda: n0.get("/status")["alive_nodes"] == ["node0"], timeout=TTL + 5)
            assert time.monotonic() - gone_at < TTL + 2
            leftovers = list_regions(f"timeshare-{JOB}-node1-")
            assert leftovers, "the killed engine should have left its pulled region behind"

            # Restarted, node1 removes the regions the killed run left.
            procs["node1"] = _engine("node1", etcd.endpoint, model, tmp_path, (p1, v1), ("node0",))
            _wait("node1 back", lambda: n1.get("/health"))
            assert not list_regions(f"timeshare-{JOB}-node1-")
        finally:
            for proc in procs.values():
                _stop(proc)
    assert not list_regions(f"timeshare-{JOB}-")
    # This test's sidecars and zygotes: their settings files are under tmp_path (other jobs may run).
    ours = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "sidecars.vllm.zygote" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"])
    ]
    assert not ours, "a vLLM sidecar survived its engine"
