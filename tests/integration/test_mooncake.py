"""Two "nodes" on one machine over Mooncake tcp on loopback: a serving process (spawned, its own
TransferEngine) and a pulling one (this test process). Every pulled tensor is compared byte for byte
after `verify_region`; subsets, corruption on the serving side, stale and unreachable
sessions, and the byte-range planning are checked; nothing is left in /dev/shm or running."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_engine.contracts.weight_region import (
    SHM_DIR,
    Manifest,
    TensorSlot,
    WeightVerificationError,
    list_regions,
    read_region,
    remove_region,
    write_region,
)
from checkpoint_engine.mooncake_transport import (
    MooncakeClient,
    MooncakeConfig,
    MooncakeError,
    MooncakeServer,
    RemoteRegion,
    measure_pull_bandwidth,
    plan_reads,
    select_slots,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PREFIX = f"timeshare-mctest{os.getpid()}-"
REPLY_TIMEOUT_S = 60
REPO = Path(__file__).resolve().parents[2]


def _serve_main() -> None:
    """The serving node, run as `python -c`: a MooncakeServer driven by one JSON command per stdin
    line ({"cmd": "serve"|"unserve", "arg": ...}); replies go to stdout as "REPLY <json>" lines
    (glog writes to stderr, but the prefix keeps any stray output apart)."""
    with MooncakeServer(MooncakeConfig(protocol="tcp", hostname="127.0.0.1")) as server:
        for line in sys.stdin:
            msg = json.loads(line)
            try:
                if msg["cmd"] == "serve":
                    reply = ["ok", server.serve(Manifest.from_dict(msg["arg"])).to_dict()]
                else:
                    server.unserve(msg["arg"])
                    reply = ["ok", None]
            except Exception as e:
                reply = ["error", f"{type(e).__name__}: {e}"]
            print("REPLY", json.dumps(reply), flush=True)


class ServingNode:
    """The other "node": a separate process with its own TransferEngine; stdin EOF stops it."""

    def __init__(self, log_path: Path) -> None:
        self._log = log_path.open("w")
        code = "from tests.integration.test_mooncake import _serve_main; _serve_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._replies: queue.Queue[list[Any]] = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("REPLY "):
                self._replies.put(json.loads(line.removeprefix("REPLY ")))

    def _call(self, cmd: str, arg: Any) -> Any:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "arg": arg}) + "\n")
        self.proc.stdin.flush()
        try:
            status, value = self._replies.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"serving process gave no answer to {cmd!r} (exit code {self.proc.poll()})")
        assert status == "ok", value
        return value

    def serve(self, manifest: Manifest) -> RemoteRegion:
        # The record crosses as JSON, as it does through the etcd registry.
        return RemoteRegion.from_dict(self._call("serve", manifest.to_dict()))

    def unserve(self, version: int) -> None:
        self._call("unserve", version)

    def stop(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(REPLY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.proc.stdout.close()
            self._log.close()


@pytest.fixture(scope="module")
def serving_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingNode]:
    log_path = tmp_path_factory.mktemp("mooncake") / "server.log"
    node = ServingNode(log_path)
    try:
        yield node
    finally:
        rc = node.stop()
        assert rc == 0, f"serving process exited with {rc}: {log_path.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def client() -> Iterator[MooncakeClient]:
    with MooncakeClient(MooncakeConfig(chunk_bytes=1 << 20)) as c:  # small chunks: multi-read paths run
        yield c


@pytest.fixture
def region() -> Iterator[Callable[[str], str]]:
    """Region names for one test; every region under the test prefix is removed afterwards."""
    yield lambda name: PREFIX + name
    for name in list_regions(PREFIX):
        remove_region(name)
    assert list_regions(PREFIX) == []


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(1024, 1024, generator=g),  # 4 MiB: several 1 MiB chunks
        "model.layers.0.mlp.up_proj.weight": torch.randn(777, 1001, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(333, generator=g).to(torch.float16),
        "model.step": torch.randint(-(2**62), 2**62, (50_000,), generator=g, dtype=torch.int64),
        "model.scalar": torch.tensor([3.5]),  # (write_region cannot take 0-d tensors)
        "model.empty": torch.empty(0, 4),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _flip_byte(region: str, offset: int) -> None:
    with open(SHM_DIR / region, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def test_pull_whole_region_is_byte_identical(serving_node: ServingNode, client: MooncakeClient, region) -> None:
    tensors = _tensors(0)
    manifest = write_region(region("full"), 7, tensors)
    remote = serving_node.serve(manifest)
    assert (remote.region, remote.version, remote.size) == (manifest.region, 7, manifest.size)
    assert remote.session.startswith("127.0.0.1:")
    assert remote.session != client.session
    try:
        local = client.pull(remote, manifest, region("full-pulled"))
    finally:
        serving_node.unserve(7)
    assert local == Manifest(region("full-pulled"), 7, manifest.size, manifest.slots)
    read_region(local)
    pulled = dict(read_region(local))
    assert list(pulled) == list(tensors)
    for name, t in tensors.items():
        assert _same_bytes(pulled[name], t), name


def test_pull_subset_reads_only_those_tensors(serving_node: ServingNode, client: MooncakeClient, region) -> None:
    tensors = _tensors(2)
    manifest = write_region(region("subset"), 9, tensors)
    wanted = ["model.step", "model.layers.0.mlp.up_proj.weight"]
    remote = serving_node.serve(manifest)
    try:
        local = client.pull(remote, manifest, region("subset-pulled"), wanted)
    finally:
        serving_node.unserve(9)
    assert [s.name for s in local.slots] == ["model.layers.0.mlp.up_proj.weight", "model.step"]  # manifest order
    assert local.size == manifest.size  # same layout: offsets stay valid
    read_region(local)
    for name, t in read_region(local):
        assert _same_bytes(t, tensors[name]), name
    raw = (SHM_DIR / local.region).read_bytes()
    embed = next(s for s in manifest.slots if s.name == "model.embed_tokens.weight")
    assert raw[embed.offset : embed.offset + embed.nbytes] == bytes(embed.nbytes)  # never pulled


def test_corrupted_byte_on_serving_side_fails_verification(
    serving_node: ServingNode, client: MooncakeClient, region
) -> None:
    manifest = write_region(region("corrupt"), 10, _tensors(3))
    remote = serving_node.serve(manifest)
    victim = next(s for s in manifest.slots if s.name == "model.layers.0.input_layernorm.weight")
    _flip_byte(manifest.region, victim.offset + victim.nbytes // 2)  # the served mapping shares these pages
    try:
        local = client.pull(remote, manifest, region("corrupt-pulled"))
    finally:
        serving_node.unserve(10)
    with pytest.raises(WeightVerificationError, match=r"model\.layers\.0\.input_layernorm\.weight"):
        read_region(local)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_session_fails_naming_it(client: MooncakeClient, region) -> None:
    manifest = write_region(region("unreachable"), 11, _tensors(4))
    session = f"127.0.0.1:{_closed_port()}"
    remote = RemoteRegion(session, manifest.region, 11, base_addr=1 << 40, size=manifest.size)
    with pytest.raises(MooncakeError, match=rf"reading bytes \[0, \d+\) .* from {session} failed"):
        client.pull(remote, manifest, region("unreachable-pulled"))
    assert not (SHM_DIR / region("unreachable-pulled")).exists()  # no half-written copy left behind


def test_stale_registry_entries_are_refused(serving_node: ServingNode, client: MooncakeClient, region) -> None:
    manifest = write_region(region("stale"), 12, _tensors(5))
    remote = serving_node.serve(manifest)
    shifted = RemoteRegion(remote.session, remote.region, 12, remote.base_addr + (64 << 20), remote.size)
    with pytest.raises(MooncakeError, match=f"from {remote.session} failed"):
        client.pull(shifted, manifest, region("stale-pulled"))
    serving_node.unserve(12)
    with pytest.raises(MooncakeError, match=f"of region {manifest.region} .* from {remote.session} failed"):
        client.pull(remote, manifest, region("stale-pulled"))
    assert not (SHM_DIR / region("stale-pulled")).exists()


def test_mismatched_manifest_is_refused_before_any_transfer(client: MooncakeClient, region) -> None:
    manifest = write_region(region("mismatch"), 13, _tensors(6))
    remote = RemoteRegion("127.0.0.1:1", manifest.region, 14, 1 << 40, manifest.size)
    with pytest.raises(ValueError, match="does not match the manifest"):
        client.pull(remote, manifest, region("mismatch-pulled"))
    with pytest.raises(KeyError, match=r"model\.nope"):
        select_slots(manifest, ["model.scalar", "model.nope"])
    assert not (SHM_DIR / region("mismatch-pulled")).exists()


def test_remote_region_round_trip_and_schema() -> None:
    remote = RemoteRegion("10.0.0.2:15001", "timeshare-job-node1-v3", 3, 140_000_000_000, 4096)
    assert RemoteRegion.from_dict(json.loads(json.dumps(remote.to_dict()))) == remote
    with pytest.raises(ValueError, match="schema 2 is not understood"):
        RemoteRegion.from_dict({**remote.to_dict(), "schema": 2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "udp"}, r"mooncake\.protocol='udp' .*valid values: \['tcp', 'rdma'\]"),
        ({"device_name": "mlx5_0"}, r"mooncake\.device_name='mlx5_0' only takes effect with mooncake\.protocol"),
        ({"hostname": "10.0.0.1:12345"}, r"mooncake\.hostname='10\.0\.0\.1:12345' .*without a port"),
        ({"hostname": ""}, r"mooncake\.hostname=''"),
        ({"chunk_bytes": 0}, r"mooncake\.chunk_bytes=0 must be a positive number"),
    ],
)
def test_config_validation_names_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MooncakeConfig(**kwargs)


def test_config_accepts_rdma_with_devices() -> None:
    assert MooncakeConfig(protocol="rdma", device_name="mlx5_0,mlx5_1", hostname="10.0.0.1").protocol == "rdma"


def _slot(name: str, offset: int, nbytes: int) -> TensorSlot:
    return TensorSlot(name, "float32", (nbytes // 4,), offset, nbytes)


@pytest.mark.parametrize(
    ("slots", "chunk", "reads"),
    [
        ([], 100, []),
        ([_slot("a", 0, 40)], 100, [(0, 40)]),
        ([_slot("a", 0, 250)], 100, [(0, 100), (100, 100), (200, 50)]),
        ([_slot("a", 0, 40), _slot("b", 256, 40)], 1000, [(0, 296)]),  # padding gap (< 256): one read
        ([_slot("b", 512, 40), _slot("a", 0, 40)], 1000, [(0, 40), (512, 40)]),  # a skipped slot between
        ([_slot("a", 0, 40), _slot("z", 256, 0), _slot("b", 1024, 8)], 1000, [(0, 40), (1024, 8)]),  # empty
    ],
)
def test_plan_reads(slots: list[TensorSlot], chunk: int, reads: list[tuple[int, int]]) -> None:
    assert plan_reads(slots, chunk) == reads


def test_measure_pull_bandwidth_reports_both_numbers() -> None:
    result = measure_pull_bandwidth(16 << 20)
    assert result.nbytes == 16 << 20
    assert result.pull_gbps > 0
    assert result.copy_gbps > 0
    assert result.copy_warm_gbps > 0
    assert list_regions(f"timeshare-bench-{os.getpid()}-") == []
