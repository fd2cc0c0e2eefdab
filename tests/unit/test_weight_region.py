"""Shared-memory weight buffer: layout planning and a write/read round trip through /dev/shm."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from checkpoint_engine.contracts.weight_region import (
    ALIGNMENT,
    SHM_DIR,
    Manifest,
    RegionWriter,
    WeightVerificationError,
    as_bytes,
    checksum,
    list_regions,
    plan_layout,
    read_region,
    region_name,
    remove_region,
    retire_region,
    write_region,
)


@pytest.fixture
def region():
    name = f"timeshare-test-{uuid.uuid4().hex[:8]}"
    yield name
    remove_region(name)


def test_layout_is_aligned_and_disjoint() -> None:
    tensors = {"a": torch.zeros(3), "b": torch.zeros(5, 7, dtype=torch.bfloat16), "c": torch.zeros(1)}
    slots, size = plan_layout(tensors)
    assert [s.offset % ALIGNMENT for s in slots] == [0, 0, 0]
    assert [s.nbytes for s in slots] == [12, 70, 4]
    ends = [s.offset + s.nbytes for s in slots]
    assert all(end <= nxt.offset for end, nxt in zip(ends, slots[1:], strict=False))
    assert size == ends[-1]


def test_round_trip_preserves_every_byte(region: str) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(33, 17, generator=g),
        "b16": torch.randn(9, generator=g).to(torch.bfloat16),
        "h": torch.randn(4, 4, generator=g).half(),
        "ids": torch.arange(5),
    }
    manifest = Manifest.from_dict(write_region(region, 3, tensors).to_dict())
    assert manifest.version == 3
    read_region(manifest)
    assert region in list_regions()
    got = dict(read_region(manifest))
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], t), name


def test_existing_region_is_not_overwritten(region: str) -> None:
    first = write_region(region, 1, {"x": torch.ones(2)})
    with pytest.raises(FileExistsError):
        write_region(region, 2, {"x": torch.zeros(2)})
    assert torch.equal(dict(read_region(first))["x"], torch.ones(2))


def test_unsupported_dtype_and_schema_are_refused(region: str) -> None:
    with pytest.raises(ValueError, match="complex64"):
        write_region(region, 1, {"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="schema 9"):
        Manifest.from_dict({"schema": 9, "region": region, "version": 1, "size": 1, "slots": []})


def test_corrupted_tensor_is_refused_by_name(region: str) -> None:
    manifest = write_region(region, 4, {"a": torch.ones(64), "layer.b": torch.ones(64)})
    b = next(s for s in manifest.slots if s.name == "layer.b")
    with open(f"/dev/shm/{region}", "r+b") as f:  # flip one byte in the middle of "layer.b"
        f.seek(b.offset + 17)
        byte = f.read(1)
        f.seek(b.offset + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightVerificationError, match=r"'layer\.b' of weight version 4"):
        read_region(manifest)
    assert dict(read_region(manifest, verify=False))["layer.b"][4].item() != 1.0


def test_scalar_tensors_round_trip(region: str) -> None:
    manifest = write_region(region, 1, {"scale": torch.tensor(2.5), "v": torch.ones(3)})
    got = dict(read_region(manifest))
    assert got["scale"].shape == ()
    assert got["scale"].item() == 2.5


@pytest.fixture
def writer():
    w = RegionWriter(f"test{uuid.uuid4().hex[:8]}", "node0")
    yield w
    w.close()
    for name in list_regions(f"timeshare-{w.job}-"):
        remove_region(name)


def _inode(name: str) -> int:
    return (SHM_DIR / name).stat().st_ino


def test_writer_alternates_two_files_in_steady_state(writer: RegionWriter) -> None:
    """v is live while v+1 is written; the store then retires v. Versions 1..6 use two files."""
    inodes, previous = [], None
    for version in range(1, 7):
        manifest = writer.write(version, {"w": torch.full((1000,), float(version))})
        assert manifest.region == region_name(writer.job, writer.node, version)
        assert torch.equal(dict(read_region(manifest))["w"], torch.full((1000,), float(version)))
        inodes.append(_inode(manifest.region))
        if previous:
            retire_region(previous, writer.spare)
        previous = manifest.region
    assert len(set(inodes)) == 2
    assert inodes[2:] == inodes[:2] * 2
    assert list_regions(f"timeshare-{writer.job}-") == sorted([previous, writer.spare])


def test_writer_resizes_a_recycled_region(writer: RegionWriter) -> None:
    first = writer.write(1, {"w": torch.ones(4096)})
    retire_region(first.region, writer.spare)
    second = writer.write(2, {"w": torch.ones(10), "extra": torch.arange(8192, dtype=torch.int64)})
    assert (SHM_DIR / second.region).stat().st_size == second.size
    got = dict(read_region(second))
    assert torch.equal(got["extra"], torch.arange(8192))
    assert torch.equal(got["w"], torch.ones(10))


def test_writer_refuses_an_existing_version_and_drops_removed_files(writer: RegionWriter) -> None:
    first = writer.write(1, {"w": torch.ones(4)})
    with pytest.raises(FileExistsError, match=first.region):
        writer.write(1, {"w": torch.ones(4)})
    remove_region(first.region)  # the store unlinked it: its memory must not stay mapped here
    writer.write(2, {"w": torch.ones(4)})
    assert len(writer._kept) == 1


def test_a_restarted_writer_discards_the_version_its_predecessor_left_half_written(writer: RegionWriter) -> None:
    """A rank that died during EXPORT left its region unregistered; the rank started again in its place
    removes it and writes the version whole."""
    writer.write(3, {"w": torch.zeros(256)})
    successor = RegionWriter(writer.job, writer.node)
    with pytest.raises(FileExistsError):
        successor.write(3, {"w": torch.ones(256)})
    successor.discard(3)
    manifest = successor.write(3, {"w": torch.ones(256)})
    assert torch.equal(dict(read_region(manifest))["w"], torch.ones(256))
    successor.close()


def test_checksum_comes_from_the_source_and_catches_a_bad_copy(writer: RegionWriter) -> None:
    manifest = writer.write(1, {"a": torch.arange(64, dtype=torch.float32)})
    assert manifest.slots[0].checksum == checksum(as_bytes(torch.arange(64, dtype=torch.float32)))
    raw = np.memmap(SHM_DIR / manifest.region, dtype=np.uint8, mode="r+")
    raw[manifest.slots[0].offset] ^= 1
    raw.flush()
    del raw
    with pytest.raises(WeightVerificationError, match="'a'"):
        read_region(manifest)
