"""This node's weight regions: the versions it holds in /dev/shm, and how to get one it lacks.

A producer on this node (the trainer's EXPORT) writes region `timeshare-{job}-{node}-v{version}`
and registers it here; the store records it in etcd (with how other nodes can read it, when a
Mooncake server is running) and serves it. For UPDATE_WEIGHTS, `resolve(version)` returns a
local manifest: the node's own region, or a replica pulled from a node that registered it.
A dropped version's region is not unlinked but renamed to the node's spare region, which the
next EXPORT's `weight_region.RegionWriter` renames into place: writing into touched pages runs
about three times faster than into a fresh tmpfs file.
Regions of this job and node left by a crashed run are removed at start-up; all are removed on close.
A version in GPU memory (`transfer.local=cuda_ipc`, one node) is registered and resolved the same way;
its memory is the trainer's, so dropping it here only forgets it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from checkpoint_engine.contracts.engine_api import BadRequest, NotNow
from checkpoint_engine.contracts.weight_region import (
    REGION_PREFIX,
    Manifest,
    list_regions,
    remove_region,
    retire_region,
    spare_region_name,
)
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.mooncake_transport import MooncakeClient, MooncakeConfig, MooncakeServer, RemoteRegion

log = logging.getLogger(__name__)


class UnknownVersionError(LookupError):
    pass


@dataclass
class _Held:
    manifest: Manifest
    replica: bool


class WeightStore:
    def __init__(self, coordinator: Coordinator, job: str, node: str, mooncake: MooncakeConfig | None) -> None:
        self.coordinator, self.job, self.node = coordinator, job, node
        self.prefix = f"{REGION_PREFIX}{job}-{node}-"
        self.spare = spare_region_name(job, node)
        stale = list_regions(self.prefix)
        for name in stale:
            remove_region(name)
        if stale:
            log.warning("removed %d stale weight regions left by an earlier run: %s", len(stale), stale)
        self._held: dict[int, _Held] = {}
        self._server = MooncakeServer(mooncake) if mooncake else None
        self._client = MooncakeClient(mooncake) if mooncake else None

    def register(self, manifest: Manifest) -> None:
        """Record a region a producer on this node wrote; publish it in the etcd shard registry."""
        if not manifest.region.startswith(self.prefix):
            raise BadRequest(f"region {manifest.region!r} does not belong to this node (expected {self.prefix}*)")
        if manifest.version in self._held:
            raise NotNow(f"weight version {manifest.version} is already registered on {self.node}")
        if self._server and manifest.on_device:
            raise BadRequest(
                f"weight version {manifest.version} is in GPU memory, which Mooncake does not serve to other "
                "nodes: a job with transfer.kind=mooncake exports to shared memory (transfer.local=shm)"
            )
        transport = self._server.serve(manifest).to_dict() if self._server else {}
        self._held[manifest.version] = _Held(manifest, replica=False)
        self.coordinator.register_shards(manifest.version, manifest.to_dict(), transport)

    def resolve(self, version: int) -> Manifest:
        """A manifest of `version` readable on this node, pulling it from another node if needed."""
        held = self._held.get(version)
        if held:
            return held.manifest
        records = {n: r for n, r in self.coordinator.shards(version).items() if n != self.node and r.transport}
        if not records or self._client is None:
            known = sorted(self._held)
            raise UnknownVersionError(
                f"weight version {version} is unknown on {self.node}: not produced here (held: {known}) and "
                + ("no other node registered it" if self._client else "no transport to other nodes is configured")
            )
        node, record = sorted(records.items())[0]
        # The replica is named under this node's prefix, so a crash leaves nothing start-up misses.
        remote, theirs = RemoteRegion.from_dict(record.transport), Manifest.from_dict(record.manifest)
        manifest = self._client.pull(remote, theirs, f"{self.prefix}v{version}-pulled")
        self._held[version] = _Held(manifest, replica=True)
        log.info("pulled weight version %d from %s", version, node)
        return manifest

    def drop_older_than(self, version: int) -> list[int]:
        """Remove regions of versions before `version` (vLLM has moved on)."""
        dropped = [v for v in self._held if v < version]
        for v in dropped:
            self._drop(v)
        return dropped

    def _drop(self, version: int, keep_pages: bool = True) -> None:
        held = self._held.pop(version)
        try:
            if self._server and not held.replica:
                self._server.unserve(version)
        finally:
            if held.manifest.on_device:
                pass  # a GPU region (transfer.local=cuda_ipc) is the trainer's: it frees it before ONLOAD
            elif keep_pages and not held.replica:
                retire_region(held.manifest.region, self.spare)
            else:
                remove_region(held.manifest.region)

    def versions(self) -> list[int]:
        return sorted(self._held)

    def close(self) -> None:
        for v in list(self._held):
            self._drop(v, keep_pages=False)
        remove_region(self.spare)
        if self._server:
            self._server.close()
        if self._client:
            self._client.close()
