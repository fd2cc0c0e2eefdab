"""Weight regions across nodes through the Mooncake TransferEngine (RDMA on clusters, TCP anywhere).

Serving node: `MooncakeServer.serve(manifest)` maps the node's shared-memory region (written by
`weight_region.write_region`), registers it with its TransferEngine and returns a `RemoteRegion`, the
small record that goes into the etcd shard registry next to the manifest.
Pulling node: `MooncakeClient.pull(remote, manifest, local_region, slots)` creates a region of the
same layout in this node's /dev/shm, reads the wanted byte ranges into it (one-sided reads: the
serving node's Python is not involved; its engine threads answer over tcp, its NIC over RDMA) and
returns the `Manifest` of the local copy. The local vLLM
then verifies and loads it (`weight_region.read_region`) exactly as a same-node push.

Both engines use Mooncake's P2P handshake: no metadata server; a session is "host:rpc_port" and the
serving engine picks the port. `mooncake` is imported inside the classes only, so the phase logic
and `engine/` import without it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from checkpoint_engine.contracts.weight_region import (
    ALIGNMENT,
    SHM_DIR,
    Manifest,
    TensorSlot,
    map_region,
    remove_region,
)

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma")
REMOTE_REGION_SCHEMA = 1
_HANDSHAKE = "P2PHANDSHAKE"  # peers exchange segment descriptors directly; no etcd/HTTP metadata server
_MIB = 1 << 20


class MooncakeError(RuntimeError):
    """The TransferEngine refused to start, to register memory, or to move bytes."""


@dataclass(frozen=True)
class MooncakeConfig:
    """One node's TransferEngine settings (the `weights.mooncake` slice of the config)."""

    protocol: str = "tcp"
    device_name: str = ""  # RDMA NICs, comma-separated ("mlx5_0,mlx5_1"); empty: every NIC Mooncake finds
    hostname: str = "127.0.0.1"  # the address other nodes reach this one at; no port (the handshake picks it)
    chunk_bytes: int = 64 * _MIB  # largest single read; also bounds the byte range an error can name

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"mooncake.protocol={self.protocol!r} is not supported; valid values: {list(PROTOCOLS)}")
        if self.device_name and self.protocol != "rdma":
            raise ValueError(
                f"mooncake.device_name={self.device_name!r} only takes effect with mooncake.protocol='rdma' "
                f"(protocol is {self.protocol!r}); leave it empty"
            )
        if not self.hostname or any(c.isspace() for c in self.hostname) or self.hostname.count(":") == 1:
            raise ValueError(
                f"mooncake.hostname={self.hostname!r} must be a host name or IP address without a port "
                "(the P2P handshake picks the RPC port)"
            )
        if self.chunk_bytes <= 0:
            raise ValueError(f"mooncake.chunk_bytes={self.chunk_bytes} must be a positive number of bytes")


@dataclass(frozen=True)
class RemoteRegion:
    """Where a served region can be read from: goes into the etcd registry as `to_dict()`."""

    session: str  # "host:rpc_port" of the serving TransferEngine
    region: str  # region name on the serving node (the manifest's `region`)
    version: int  # weight version held by the region
    base_addr: int  # virtual address of the region's first byte in the serving process
    size: int  # bytes registered, starting at base_addr
    schema: int = REMOTE_REGION_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RemoteRegion:
        if d.get("schema") != REMOTE_REGION_SCHEMA:
            raise ValueError(
                f"remote region schema {d.get('schema')!r} is not understood (expected {REMOTE_REGION_SCHEMA})"
            )
        return cls(
            session=d["session"], region=d["region"], version=d["version"], base_addr=d["base_addr"], size=d["size"]
        )


def select_slots(manifest: Manifest, slots: Collection[str] | None) -> Manifest:
    """`manifest` restricted to the named tensors (in manifest order); None keeps every tensor."""
    if slots is None:
        return manifest
    known = {s.name for s in manifest.slots}
    unknown = sorted(set(slots) - known)
    if unknown:
        raise KeyError(f"tensors {unknown} are not in weight version {manifest.version} ({manifest.region})")
    wanted = set(slots)
    return replace(manifest, slots=tuple(s for s in manifest.slots if s.name in wanted))


def plan_reads(slots: Sequence[TensorSlot], chunk_bytes: int, gap: int = ALIGNMENT) -> list[tuple[int, int]]:
    """(offset, length) reads covering `slots`: neighbours closer than `gap` bytes (alignment padding)
    are merged into one range, and each range is cut into reads of at most `chunk_bytes`."""
    ranges: list[list[int]] = []
    for s in sorted((s for s in slots if s.nbytes), key=lambda s: s.offset):
        if ranges and s.offset - ranges[-1][1] < gap:
            ranges[-1][1] = max(ranges[-1][1], s.offset + s.nbytes)
        else:
            ranges.append([s.offset, s.offset + s.nbytes])
    return [(o, min(chunk_bytes, end - o)) for start, end in ranges for o in range(start, end, chunk_bytes)]


def _address(buf: mmap.mmap) -> int:
    # ctypes needs a writable buffer; the temporary export is dropped at once so that buf.close() works.
    anchor = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(anchor)
    del anchor
    return addr


def _start_transfer_engine(cfg: MooncakeConfig) -> tuple[Any, str]:
    """A started TransferEngine and its session id "host:rpc_port"."""
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise ImportError(
            "the Mooncake transport needs `mooncake-transfer-engine` (CUDA) or `mooncake-transfer-engine-non-cuda`"
        ) from e
    engine = TransferEngine()
    rc = engine.initialize(cfg.hostname, _HANDSHAKE, cfg.protocol, cfg.device_name)
    if rc != 0:
        raise MooncakeError(
            f"TransferEngine.initialize(hostname={cfg.hostname!r}, protocol={cfg.protocol!r}, "
            f"device_name={cfg.device_name!r}) failed with code {rc}"
        )
    return engine, f"{cfg.hostname}:{engine.get_rpc_port()}"


@dataclass
class _Served:
    buf: mmap.mmap
    remote: RemoteRegion


class MooncakeServer:
    """Makes this node's weight regions readable by other nodes; one per checkpoint engine."""

    def __init__(self, cfg: MooncakeConfig) -> None:
        self.cfg = cfg
        self._transfer, self.session = _start_transfer_engine(cfg)
        self._served: dict[int, _Served] = {}

    def serve(self, manifest: Manifest) -> RemoteRegion:
        """Map and register `manifest`'s region; it stays readable until `unserve(manifest.version)`."""
        if manifest.version in self._served:
            raise ValueError(
                f"weight version {manifest.version} is already served from {self._served[manifest.version]}"
            )
        # Mapped read-write: RDMA registration (ibv_reg_mr with local write access) fails on read-only pages.
        buf = map_region(SHM_DIR / manifest.region, manifest.size, create=False)
        addr = _address(buf)
        rc = self._transfer.register_memory(addr, manifest.size)
        if rc != 0:
            buf.close()
            raise MooncakeError(f"registering region {manifest.region} ({manifest.size} bytes) failed with code {rc}")
        remote = RemoteRegion(self.session, manifest.region, manifest.version, addr, manifest.size)
        self._served[manifest.version] = _Served(buf, remote)
        log.info(
            "serving weight version %d: %s (%d bytes) at %s",
            manifest.version,
            manifest.region,
            manifest.size,
            self.session,
        )
        return remote

    def unserve(self, version: int) -> None:
        """Unregister and unmap the region of `version`; later reads of it are refused by the engine."""
        served = self._served.pop(version)
        rc = self._transfer.unregister_memory(served.remote.base_addr)
        served.buf.close()
        if rc != 0:
            raise MooncakeError(f"unregistering region {served.remote.region} failed with code {rc}")

    def served(self) -> list[RemoteRegion]:
        return [s.remote for s in self._served.values()]

    def close(self) -> None:
        """Stop serving everything; dropping the engine closes its listening sockets (it has no close())."""
        for version in list(self._served):
            self.unserve(version)
        self._transfer = None

    def __enter__(self) -> MooncakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MooncakeClient:
    """Pulls other nodes' regions into this node's shared memory (the weight store names the copy)."""

    def __init__(self, cfg: MooncakeConfig) -> None:
        self.cfg = cfg
        self._transfer, self.session = _start_transfer_engine(cfg)

    def pull(
        self, remote: RemoteRegion, manifest: Manifest, local_region: str, slots: Collection[str] | None = None
    ) -> Manifest:
        """Copy `manifest`'s tensors (or the named `slots`) from `remote` into a new local region
        `local_region` of the same layout; returns its manifest (same slots and checksums, local name).
        Bytes are not verified here: `read_region` does it where they are loaded."""
        _check_matches(remote, manifest)
        wanted = select_slots(manifest, slots)
        reads = plan_reads(wanted.slots, self.cfg.chunk_bytes)
        start = time.perf_counter()
        buf = map_region(SHM_DIR / local_region, manifest.size, create=True)
        try:
            self._read_into(buf, remote, reads)
        except BaseException:
            buf.close()
            remove_region(local_region)
            raise
        buf.close()
        nbytes, seconds = sum(n for _, n in reads), time.perf_counter() - start
        log.info(
            "pulled %d tensors (%.1f MB) of weight version %d from %s in %.2f s (%.2f GB/s)",
            len(wanted.slots),
            nbytes / 1e6,
            manifest.version,
            remote.session,
            seconds,
            nbytes / max(seconds, 1e-9) / 1e9,
        )
        return replace(wanted, region=local_region)

    def _read_into(self, buf: mmap.mmap, remote: RemoteRegion, reads: list[tuple[int, int]]) -> None:
        addr = _address(buf)
        rc = self._transfer.register_memory(addr, len(buf))
        if rc != 0:
            raise MooncakeError(
                f"registering the local copy of {remote.region} ({len(buf)} bytes) failed with code {rc}"
            )
        try:
            for offset, length in reads:
                rc = self._transfer.transfer_sync_read(remote.session, addr + offset, remote.base_addr + offset, length)
                if rc != 0:
                    raise MooncakeError(
                        f"reading bytes [{offset}, {offset + length}) of region {remote.region} (weight version "
                        f"{remote.version}) from {remote.session} failed with code {rc}: the peer is unreachable, "
                        "no longer serves this version, or the registry entry is stale"
                    )
        finally:
            self._transfer.unregister_memory(addr)

    def close(self) -> None:
        self._transfer = None

    def __enter__(self) -> MooncakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_matches(remote: RemoteRegion, manifest: Manifest) -> None:
    mine = (manifest.region, manifest.version, manifest.size)
    theirs = (remote.region, remote.version, remote.size)
    if mine != theirs:
        raise ValueError(
            f"remote region (region, version, size)={theirs} at {remote.session} does not match the manifest's {mine}"
        )


@dataclass(frozen=True)
class PullBandwidth:
    nbytes: int
    pull_gbps: float  # Mooncake read into a fresh local region (best of the repeats)
    copy_gbps: float  # numpy copy of the same bytes into a fresh region: the same-node ceiling
    copy_warm_gbps: float  # the same copy again into the now-faulted region: memory bandwidth alone


def measure_pull_bandwidth(
    nbytes: int = 256 * _MIB, cfg: MooncakeConfig | None = None, repeats: int = 1
) -> PullBandwidth:
    """Pull `nbytes` through two TransferEngines in this process (loopback for tcp) and copy the same
    bytes with numpy, alternately, `repeats` times; best of each. Every destination is a fresh region,
    so both pay the same page faults (slow and noisy on a VM's first touch: hence the repeats)."""
    cfg = cfg or MooncakeConfig()
    tag = f"timeshare-bench-{os.getpid()}-{time.monotonic_ns()}"
    src_name, dst_name = f"{tag}-src", f"{tag}-dst"
    size = max(nbytes // 4, 1) * 4
    manifest = Manifest(src_name, 0, size, (TensorSlot("bytes", "float32", (size // 4,), 0, size),))
    pull_s, copy_s, warm_s = [], [], []
    try:
        src_buf = map_region(SHM_DIR / src_name, size, create=True)
        src = np.frombuffer(src_buf, dtype=np.uint8)
        src[:] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        with MooncakeServer(cfg) as server, MooncakeClient(cfg) as client:
            remote = server.serve(manifest)
            for _ in range(repeats):
                start = time.perf_counter()
                client.pull(remote, manifest, dst_name)
                pull_s.append(time.perf_counter() - start)
                remove_region(dst_name)
                dst_buf = map_region(SHM_DIR / dst_name, size, create=True)
                dst = np.frombuffer(dst_buf, dtype=np.uint8)
                start = time.perf_counter()
                np.copyto(dst, src)
                copy_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                np.copyto(dst, src)
                warm_s.append(time.perf_counter() - start)
                del dst
                dst_buf.close()
                remove_region(dst_name)
        del src
        src_buf.close()
    finally:
        remove_region(src_name)
        remove_region(dst_name)
    return PullBandwidth(size, *(size / min(t) / 1e9 for t in (pull_s, copy_s, warm_s)))
