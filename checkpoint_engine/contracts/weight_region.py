"""Weight buffer: HF-named tensors packed at aligned offsets in one region, in shared memory or on a GPU.

The producer (trainer EXPORT) writes through a `RegionWriter` (or the one-shot `write_region`);
the consumer (vLLM's worker extension) calls `read_region` with the `Manifest` and gets verified
tensors that view the region's bytes (no copy, no disk).
A region is a file under /dev/shm (what shm_open creates on Linux); files are used directly rather
than `multiprocessing.shared_memory`, whose resource tracker unlinks a segment when any process
that attached to it exits. A manifest with a `DeviceHandle` names a region in GPU memory instead,
which `cuda_ipc.DeviceRegionWriter` wrote and shares by CUDA IPC; the slots and checksums are the same.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")
ALIGNMENT = 256  # bytes; keeps every tensor start aligned for vectorised loads
REGION_PREFIX = "timeshare-"
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.int64)}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str = ""  # xxh3-128 of the tensor's bytes, hex; filled in by write_region


@dataclass(frozen=True)
class DeviceHandle:
    """A region in GPU memory as CUDA IPC shares it (what torch's `_share_cuda_` returns, bytes as hex),
    and the GPU by its UUID: two processes on one node may number the GPUs differently."""

    device_uuid: str
    handle: str  # cudaIpcMemHandle of the allocation that holds the region
    size: int  # bytes of the region's storage
    offset: int  # of the storage in that allocation
    ref_counter: str  # the producer's shared counter of the region's users (a file name, hex)
    ref_counter_offset: int
    event: str  # an IPC event the producer recorded after its last write (hex)
    event_sync_required: bool


@dataclass(frozen=True)
class Manifest:
    """Where each tensor of one weight version lives; small and picklable (it crosses processes)."""

    region: str
    version: int
    size: int
    slots: tuple[TensorSlot, ...] = field(default_factory=tuple)
    device: DeviceHandle | None = None  # None: the region is /dev/shm/<region>
    schema: int = 1

    @property
    def on_device(self) -> bool:
        """The region is in GPU memory (`device`), not in /dev/shm."""
        return self.device is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """One fingerprint of every tensor's name and checksum: equal on two nodes, equal weights."""
        import hashlib

        return hashlib.sha256("".join(f"{s.name}:{s.checksum};" for s in self.slots).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("schema") != 1:
            raise ValueError(f"manifest schema {d.get('schema')!r} is not understood (expected 1)")
        slots = tuple(TensorSlot(**{**s, "shape": tuple(s["shape"])}) for s in d["slots"])
        device = DeviceHandle(**d["device"]) if d.get("device") else None
        return cls(region=d["region"], version=d["version"], size=d["size"], slots=slots, device=device)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot go into a weight buffer; supported: {sorted(_DTYPES)}")
    return name


class WeightVerificationError(ValueError):
    """A pushed tensor whose bytes do not match its registered checksum, or a refused version."""


def checksum(data: np.ndarray | memoryview) -> str:
    """xxh3-128: it guards against corruption, not an adversary, and runs faster than a memory copy
    (about 17 GB/s against 11 here; blake3 manages 6 on one core), releasing the GIL while it runs."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def plan_layout(tensors: Mapping[str, torch.Tensor], alignment: int = ALIGNMENT) -> tuple[list[TensorSlot], int]:
    """Offsets for each tensor, in the mapping's order; returns the slots and the region size."""
    slots, offset = [], 0
    for name, t in tensors.items():
        offset = -(-offset // alignment) * alignment
        nbytes = t.numel() * t.element_size()
        slots.append(TensorSlot(name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes))
        offset += nbytes
    return slots, max(offset, 1)


def region_name(job: str, node: str, version: int) -> str:
    return f"{REGION_PREFIX}{job}-{node}-v{version}"


def spare_region_name(job: str, node: str) -> str:
    """Where a node keeps its retired region for the next version's `RegionWriter`."""
    return f"{REGION_PREFIX}{job}-{node}-spare"


def map_region(path: Path, size: int, create: bool) -> mmap.mmap:
    """Map a region whole, page tables populated up front: faulting them in one 4 KiB page at a time
    while copying or checksumming costs more than the checksum itself."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)  # flat first: 0-d tensors too


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 view of a CPU tensor's storage (bfloat16 has no numpy dtype, so view as bytes first)."""
    return _flat_bytes(t).numpy()


def fill_region(dst: torch.Tensor, slots: list[TensorSlot], tensors: Mapping[str, torch.Tensor]) -> list[TensorSlot]:
    """Copy `tensors` to their slots in the uint8 region `dst` (mapped shared memory, or GPU memory);
    returns the slots with checksums.

    Each checksum is computed from the source tensor on a second thread while the copy runs, so it
    states what the producer meant to send and costs no extra pass over memory; the receiver's
    verification then catches a bad copy as well as later corruption. A copy to a GPU is queued
    (asynchronous from pinned memory); the caller synchronises before sharing the region.
    """
    host = None if dst.is_cuda else dst.numpy()  # numpy's copy runs beside the checksum thread faster than torch's
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum") as pool:
        sums = []
        for s, t in zip(slots, tensors.values(), strict=True):
            src = _flat_bytes(t.cpu())  # a tensor still: a pinned source copies to the GPU asynchronously
            src_bytes = src.numpy()
            sums.append(pool.submit(checksum, src_bytes))
            if host is None:
                dst[s.offset : s.offset + s.nbytes].copy_(src, non_blocking=True)
            else:
                host[s.offset : s.offset + s.nbytes] = src_bytes
        return [replace(s, checksum=f.result()) for s, f in zip(slots, sums, strict=True)]


def write_region(name: str, version: int, tensors: Mapping[str, torch.Tensor]) -> Manifest:
    """Create region `name` and copy `tensors` (CPU) into it; fails if the region already exists."""
    slots, size = plan_layout(tensors)
    buf = map_region(SHM_DIR / name, size, create=True)
    try:
        slots = fill_region(torch.frombuffer(buf, dtype=torch.uint8), slots, tensors)
    finally:
        buf.close()
    return Manifest(region=name, version=version, size=size, slots=tuple(slots))


class RegionWriter:
    """The EXPORT side of one node: writes each weight version into its region, reusing memory.

    A fresh tmpfs file pays a page fault per 4 KiB on first write, and even a file whose pages
    exist pays one per page in a new mapping; a copy then runs at a third (fresh) to two thirds
    (remapped) of the speed of a copy into touched, mapped memory. So the weight store retires a
    version it no longer needs by renaming its region to the node's spare (`retire_region`), and
    this writer renames the spare to the next version's name and writes through a mapping it kept
    (a mapping follows the file, not its name). Versions alternate between two files in steady
    state (v is live while v+1 is written), so the writer keeps the mappings of the last two.
    """

    KEEP = 2

    def __init__(self, job: str, node: str) -> None:
        self.job, self.node = job, node
        self.spare = spare_region_name(job, node)
        self._kept: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}  # (device, inode) -> (fd, mapping)

    def write(self, version: int, tensors: Mapping[str, torch.Tensor]) -> Manifest:
        """Write `tensors` as weight version `version` of this node; fails if that region exists."""
        name = region_name(self.job, self.node, version)
        slots, size = plan_layout(tensors)
        buf = torch.frombuffer(self._claim(SHM_DIR / name, size), dtype=torch.uint8)
        slots = fill_region(buf, slots, tensors)
        return Manifest(region=name, version=version, size=size, slots=tuple(slots))

    def release(self) -> None:
        """Nothing to free before ONLOAD: a registered region belongs to the weight store, which retires it."""

    def discard(self, version: int) -> None:
        """Remove version `version`'s region that a writer which died during EXPORT left half written and never
        registered (a registered one belongs to the weight store: never call this for it)."""
        remove_region(region_name(self.job, self.node, version))

    def _claim(self, path: Path, size: int) -> mmap.mmap:
        self._forget_removed()
        if path.exists():
            raise FileExistsError(f"weight region {path.name} already exists")
        with contextlib.suppress(FileNotFoundError):  # no retired region: the file is created below
            os.rename(SHM_DIR / self.spare, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        kept = self._kept.pop(key, None)
        if kept is not None and st.st_size == size:
            os.close(fd)
            self._kept[key] = kept  # most recently used last
            return kept[1]
        if kept is not None:
            self._release(*kept)
        os.ftruncate(fd, size)  # a recycled file keeps the touched pages that fit
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self._kept[key] = (fd, buf)
        while len(self._kept) > self.KEEP:
            self._release(*self._kept.pop(next(iter(self._kept))))
        return buf

    def _forget_removed(self) -> None:
        """Release mappings of files the store has unlinked, so their memory goes back now."""
        for key, (fd, buf) in list(self._kept.items()):
            if os.fstat(fd).st_nlink == 0:
                del self._kept[key]
                self._release(fd, buf)

    @staticmethod
    def _release(fd: int, buf: mmap.mmap) -> None:
        buf.close()
        os.close(fd)

    def close(self) -> None:
        """Drop the kept mappings (the files themselves belong to the weight store)."""
        while self._kept:
            self._release(*self._kept.popitem()[1])


def read_region(manifest: Manifest, verify: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of the region, after checking every tensor against its checksum.

    A mismatch raises WeightVerificationError naming the tensor before anything is returned, so a
    corrupted push leaves the receiver on its previous version instead of half-loaded. The region
    is mapped (or opened by CUDA IPC) once; the mapping lives as long as the tensors do. A GPU
    region's tensors are checked on a host copy, one tensor at a time (the checksum runs on the CPU).
    """
    if manifest.device is not None:  # manifest.on_device, spelt so that the type checker knows it is set
        from checkpoint_engine.contracts import cuda_ipc

        raw = cuda_ipc.open_region(manifest.device)
    else:
        raw = torch.frombuffer(map_region(SHM_DIR / manifest.region, manifest.size, create=False), dtype=torch.uint8)
    views = [raw[s.offset : s.offset + s.nbytes] for s in manifest.slots]
    for s, view in zip(manifest.slots, views, strict=True) if verify else ():
        if checksum(view.cpu().numpy()) != s.checksum:
            raise WeightVerificationError(
                f"tensor {s.name!r} of weight version {manifest.version} in {manifest.region} does not match "
                f"its checksum {s.checksum or '(none)'}"
            )
    return [(s.name, v.view(_DTYPES[s.dtype]).view(s.shape)) for s, v in zip(manifest.slots, views, strict=True)]


def remove_region(name: str) -> None:
    (SHM_DIR / name).unlink(missing_ok=True)


def retire_region(name: str, spare: str) -> None:
    """Keep region `name`'s touched pages for the next version: rename it to `spare` (replacing it)."""
    os.replace(SHM_DIR / name, SHM_DIR / spare)


def list_regions(prefix: str = REGION_PREFIX) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(prefix + "*"))
