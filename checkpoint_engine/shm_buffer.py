"""Weight buffer in POSIX shared memory: HF-named tensors packed at aligned offsets in one region.

The producer (trainer EXPORT) calls `write_region`; the consumer (vLLM's worker extension) calls
`read_region` with the `Manifest` and gets tensors that view the mapped bytes (no copy, no disk).
A region is a file under /dev/shm (what shm_open creates on Linux); files are used directly rather
than `multiprocessing.shared_memory`, whose resource tracker unlinks a segment when any process
that attached to it exits.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
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
    checksum: str = ""  # blake3 of the tensor's bytes, hex; filled in by write_region


@dataclass(frozen=True)
class Manifest:
    """Where each tensor of one weight version lives; small and picklable (it crosses processes)."""

    region: str
    version: int
    size: int
    slots: tuple[TensorSlot, ...] = field(default_factory=tuple)
    schema: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("schema") != 1:
            raise ValueError(f"manifest schema {d.get('schema')!r} is not understood (expected 1)")
        slots = tuple(TensorSlot(**{**s, "shape": tuple(s["shape"])}) for s in d["slots"])
        return cls(region=d["region"], version=d["version"], size=d["size"], slots=slots)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot go into a weight buffer; supported: {sorted(_DTYPES)}")
    return name


class WeightVerificationError(ValueError):
    """A pushed tensor whose bytes do not match its registered checksum, or a refused version."""


def checksum(data: np.ndarray | memoryview) -> str:
    """blake3 (multi-threaded): faster than a memory copy here, so verifying every push is affordable."""
    import blake3

    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest(length=16)


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


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 view of a CPU tensor's storage (bfloat16 has no numpy dtype, so view as bytes first)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # flat first: 0-d tensors too


def write_region(name: str, version: int, tensors: Mapping[str, torch.Tensor]) -> Manifest:
    """Create region `name` and copy `tensors` (CPU) into it; fails if the region already exists."""
    slots, size = plan_layout(tensors)
    buf = _map(SHM_DIR / name, size, create=True)
    try:
        dst = np.frombuffer(buf, dtype=np.uint8)
        for i, t in enumerate(tensors.values()):
            s = slots[i]
            view = dst[s.offset : s.offset + s.nbytes]
            view[:] = as_bytes(t.cpu())
            slots[i] = replace(s, checksum=checksum(view))
        del dst, view
    finally:
        buf.close()
    return Manifest(region=name, version=version, size=size, slots=tuple(slots))


def _mapped_bytes(manifest: Manifest) -> torch.Tensor:
    return torch.frombuffer(_map(SHM_DIR / manifest.region, manifest.size, create=False), dtype=torch.uint8)


def verify_region(manifest: Manifest) -> None:
    """Check every tensor's bytes against its checksum; WeightVerificationError names the first bad one.

    Run before loading anything, so a corrupted push leaves the receiver on its previous version
    instead of half-loaded.
    """
    raw = _mapped_bytes(manifest)
    for s in manifest.slots:
        if checksum(raw[s.offset : s.offset + s.nbytes].numpy()) != s.checksum:
            raise WeightVerificationError(
                f"tensor {s.name!r} of weight version {manifest.version} in {manifest.region} does not match "
                f"its checksum {s.checksum or '(none)'}"
            )


def read_region(manifest: Manifest) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) viewing the mapped region; the mapping lives as long as the tensors do."""
    raw = _mapped_bytes(manifest)
    for s in manifest.slots:
        yield s.name, raw[s.offset : s.offset + s.nbytes].view(_DTYPES[s.dtype]).view(s.shape)


def remove_region(name: str) -> None:
    (SHM_DIR / name).unlink(missing_ok=True)


def list_regions(prefix: str = REGION_PREFIX) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(prefix + "*"))
