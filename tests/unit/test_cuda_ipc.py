"""The same-node push by CUDA IPC, the logic around the GPU: a device region is laid out and checksummed as a
shared-memory region is, its manifest crosses processes as plain data, the receiver verifies it, the
trainer frees it, the weight store only forgets it, and the configuration picks it where it can work.
The IPC itself (share, open in another process) runs in tests/integration/test_cuda_ipc.py, on a GPU only."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from checkpoint_engine.config import TransferConfig
from checkpoint_engine.contracts import cuda_ipc
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.engine_api import BadRequest
from checkpoint_engine.contracts.phases import Phase, PhaseState
from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.contracts.weight_region import (
    SHM_DIR,
    DeviceHandle,
    Manifest,
    RegionWriter,
    WeightVerificationError,
    list_regions,
    read_region,
)
from checkpoint_engine.weight_store import WeightStore
from launch.config_loading import load_config
from sidecars.megatron.rank_main import region_lost, weight_writer

HANDLE = DeviceHandle(
    device_uuid="GPU-0f3e",
    handle="ab" * 32,
    size=0,
    offset=0,
    ref_counter="2f746f726368",
    ref_counter_offset=3,
    event="cd" * 32,
    event_sync_required=True,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(50, 16, generator=g),
    }


class _FakeIpc:
    """Stands in for CUDA IPC on a CPU: `share` records the region and returns a handle that names it, with a
    reader count at slot 2 of a counter file laid out as torch's (a 64-byte header, then int64 slots: see
    the test of a real one below), set to 1 as a share sets it; `open_region` (patched in) returns the very
    tensor, as another process's opened handle would map it."""

    SLOT, HEADER = 2, b"\xab" * 64

    def __init__(self) -> None:
        self.shared: dict[str, torch.Tensor] = {}
        self.counters: list[Path] = []

    def share(self, region: torch.Tensor) -> DeviceHandle:
        key = f"{len(self.shared):02x}" * 32
        self.shared[key] = region
        counter = SHM_DIR / f"torch_test_{uuid.uuid4().hex[:8]}"
        counter.write_bytes(self.HEADER + struct.pack("=4q", 7, 7, 1, 7))
        self.counters.append(counter)
        return DeviceHandle(
            **{
                **HANDLE.__dict__,
                "handle": key,
                "size": region.numel(),
                "ref_counter": f"/{counter.name}".encode().hex(),
                "ref_counter_offset": self.SLOT,
            }
        )

    def readers(self) -> list[tuple[int, ...]]:
        """Each counter file's slots, once its header is seen untouched."""
        files = [c.read_bytes() for c in self.counters]
        assert all(f[:64] == self.HEADER for f in files)
        return [struct.unpack("=4q", f[64:]) for f in files]

    def open_region(self, h: DeviceHandle) -> torch.Tensor:
        return self.shared[h.handle]

    def close(self) -> None:
        for c in self.counters:
            c.unlink(missing_ok=True)


@pytest.fixture
def ipc(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeIpc]:
    fake = _FakeIpc()
    monkeypatch.setattr(cuda_ipc, "open_region", fake.open_region)
    yield fake
    fake.close()


@pytest.fixture
def job() -> Iterator[str]:
    job = f"test-{uuid.uuid4().hex[:8]}"
    yield job
    for name in list_regions(f"timeshare-{job}-"):
        (SHM_DIR / name).unlink()


def test_a_device_region_has_the_layout_and_checksums_of_a_shared_memory_region(ipc: _FakeIpc, job: str) -> None:
    tensors = _tensors()
    device = cuda_ipc.DeviceRegionWriter(job, "n0", device=torch.device("cpu"), share=ipc.share).write(3, tensors)
    shm = RegionWriter(job, "n0").write(3, tensors)
    assert (device.slots, device.size, device.region) == (shm.slots, shm.size, shm.region)
    assert device.digest() == shm.digest()  # a node that pulled the shm copy would agree on the weights
    assert device.device is not None
    assert shm.device is None

    got = dict(read_region(Manifest.from_dict(json.loads(json.dumps(device.to_dict())))))
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def test_the_receiver_refuses_a_device_region_whose_bytes_changed(ipc: _FakeIpc, job: str) -> None:
    manifest = cuda_ipc.DeviceRegionWriter(job, "n0", device=torch.device("cpu"), share=ipc.share).write(0, _tensors())
    slot = next(s for s in manifest.slots if s.name == "model.norm.weight")
    ipc.open_region(manifest.device)[slot.offset] ^= 0xFF
    with pytest.raises(WeightVerificationError, match=r"model\.norm\.weight"):
        read_region(manifest)


COUNTER_FILE = """
import json, torch
from checkpoint_engine.contracts.cuda_ipc import clear_readers
from checkpoint_engine.contracts.weight_region import DeviceHandle
slots = torch.tensor([7, 7, 1, 7], dtype=torch.int64)
_, name, _ = slots.untyped_storage()._share_filename_cpu_()
path = "/dev/shm/" + name.decode().lstrip("/")
header = open(path, "rb").read(64)
clear_readers(DeviceHandle("GPU-0", "", 0, 0, name.hex(), 2, "", False))
print(json.dumps({"path": path, "slots": slots.tolist(), "header_kept": open(path, "rb").read(64) == header}))
"""


def test_clearing_a_reader_count_writes_its_slot_of_a_real_torch_counter_file() -> None:
    """torch's RefcountedMapAllocator lays out its CUDA IPC counter files as it does a CPU storage shared by
    file name: a header, then the slots. Run apart, since sharing by file name starts torch's shm manager."""
    proc = subprocess.run(
        [sys.executable, "-c", COUNTER_FILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["slots"] == [7, 7, 0, 7]
    assert got["header_kept"]  # the file's own reference count, which torch's unlink depends on
    gone = poll_until(lambda: True if not Path(got["path"]).exists() else None, timeout=20, every=0.2)
    assert gone, "torch's shm manager removes the file once the process that shared it has exited"


def test_the_writer_holds_each_version_until_onload_releases_them(ipc: _FakeIpc, job: str) -> None:
    writer = cuda_ipc.DeviceRegionWriter(job, "n0", device=torch.device("cpu"), share=ipc.share)
    writer.write(1, _tensors())
    with pytest.raises(FileExistsError, match="version 1"):
        writer.write(1, _tensors())
    writer.write(2, _tensors())
    assert writer.versions() == [1, 2]
    writer.discard(2)  # an EXPORT that died before registering
    assert writer.versions() == [1]
    assert ipc.readers()[0] == (7, 7, 1, 7)
    writer.release()
    assert writer.versions() == []
    # Cleared, whoever read it: torch would keep a block whose count is not 0 (a vLLM restarted during ROLLOUT
    # leaves it at -1, a vLLM killed while loading at 1); the slots beside it are other shares'.
    assert ipc.readers()[0] == (7, 7, 0, 7)
    assert ipc.readers()[1] == (7, 7, 0, 7)  # the discarded version's
    writer.write(1, _tensors())  # after ONLOAD a version may be written again (a resumed run)


def test_a_manifest_without_a_device_reads_as_before() -> None:
    d = Manifest(region="timeshare-j-n0-v0", version=0, size=1).to_dict()
    del d["device"]  # what a writer of shared memory only ever sent
    assert Manifest.from_dict(d).device is None
    assert Manifest.from_dict({**d, "device": HANDLE.__dict__}).device == HANDLE


class _Coordinator:
    def __init__(self) -> None:
        self.registered: dict[int, dict] = {}

    def register_shards(self, version: int, manifest: dict, transport: dict) -> None:
        self.registered[version] = manifest

    def shards(self, version: int) -> dict:
        return {}


def test_the_weight_store_registers_a_device_region_and_only_forgets_it(job: str) -> None:
    coordinator = _Coordinator()
    store = WeightStore(coordinator, job, "n0", mooncake=None)
    spare = SHM_DIR / f"timeshare-{job}-n0-spare"
    manifest = Manifest(region=f"timeshare-{job}-n0-v0", version=0, size=8, device=HANDLE)
    store.register(manifest)
    assert coordinator.registered[0]["device"]["handle"] == HANDLE.handle
    assert store.resolve(0) == manifest
    assert store.drop_older_than(1) == [0]  # no file to retire: the trainer frees the GPU memory
    assert not spare.exists()
    assert store.versions() == []
    store.close()


def test_the_weight_store_refuses_to_serve_a_device_region_to_other_nodes(job: str) -> None:
    store = WeightStore(_Coordinator(), job, "n0", mooncake=None)
    store._server = object()  # as with transfer.kind=mooncake; register must refuse before serving
    with pytest.raises(BadRequest, match="Mooncake does not serve"):
        store.register(Manifest(region=f"timeshare-{job}-n0-v0", version=0, size=8, device=HANDLE))
    store._server = None
    store.close()


@pytest.mark.parametrize(
    ("overrides", "has_cuda", "expected"),
    [
        ([], True, "cuda_ipc"),  # auto
        ([], False, "shm"),
        (["transfer=mooncake"], True, "shm"),  # the other nodes pull the head's shared memory
        (["parallel.vllm_tp=2"], True, "shm"),  # two workers would open the region on the trainer's GPU
        (["transfer.local=shm"], True, "shm"),
        (["transfer.local=cuda_ipc"], True, "cuda_ipc"),
    ],
)
def test_the_launcher_resolves_where_the_node_exports(overrides: list[str], has_cuda: bool, expected: str) -> None:
    assert load_config(overrides).local_region(has_cuda) == expected


def test_cuda_ipc_is_refused_for_several_vllm_workers() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.local='cuda_ipc' with parallel\.vllm_tp=2"):
        load_config(["transfer.local=cuda_ipc", "parallel.vllm_tp=2"])


def test_a_rank_without_a_gpu_refuses_cuda_ipc_by_name(job: str) -> None:
    cfg = SimpleNamespace(weight_region="cuda_ipc", job=job, node="n0")
    with pytest.raises(ConfigError, match=r"transfer\.local='cuda_ipc' needs the trainer on a GPU"):
        weight_writer(cfg, on_gpu=False)
    shm = SimpleNamespace(weight_region="shm", job=job, node="n0")
    assert isinstance(weight_writer(shm, on_gpu=True), RegionWriter)


def test_mooncake_refuses_cuda_ipc() -> None:
    with pytest.raises(ConfigError, match="Mooncake cannot serve"):
        TransferConfig(kind="mooncake", local="cuda_ipc")


def test_with_a_gpu_region_vllm_starts_in_its_turn_not_during_export() -> None:
    """vLLM must size its KV cache, and NVML be read before it, with the trainer's region already on the GPU."""
    from checkpoint_engine.node_engine import NodeEngine

    started: list[object] = []
    engine = object.__new__(NodeEngine)  # only what begin_vllm_start touches
    engine._early_start, engine.vllm = None, SimpleNamespace(alive=lambda: False)
    engine._starter = SimpleNamespace(submit=started.append)
    engine.cfg = SimpleNamespace(transfer=TransferConfig(local="cuda_ipc"))
    engine.begin_vllm_start(state=None)
    assert started == []
    engine.cfg = SimpleNamespace(transfer=TransferConfig(local="shm"))
    engine.begin_vllm_start(state=None)
    assert len(started) == 1


@pytest.mark.parametrize(
    ("phase", "turn", "region", "lost"),
    [
        (Phase.EXPORT, Phase.ONLOAD, "cuda_ipc", True),  # registered, then the rank died
        (Phase.START_VLLM, Phase.ONLOAD, "cuda_ipc", True),
        (Phase.UPDATE_WEIGHTS, Phase.ONLOAD, "cuda_ipc", True),
        (Phase.ROLLOUT, Phase.ONLOAD, "cuda_ipc", False),  # vLLM has it
        (Phase.EXPORT, Phase.EXPORT, "cuda_ipc", False),  # not registered: the new ranks write it again
        (Phase.UPDATE_WEIGHTS, Phase.ONLOAD, "shm", False),  # the region outlives the rank
    ],
)
def test_restarted_ranks_know_when_the_version_died_with_their_predecessor(
    phase: Phase, turn: Phase, region: str, lost: bool
) -> None:
    assert region_lost(PhaseState(iteration=3, phase=phase, weight_version=3), turn, region) is lost
