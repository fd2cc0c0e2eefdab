"""The same-node push on a GPU: a weight region in device memory, shared with vLLM's workers by CUDA IPC.

The trainer's EXPORT (`DeviceRegionWriter`) copies the HF tensors from its pinned host copies (what OFFLOAD
left) into one device allocation, laid out and checksummed as a shared-memory region is
(`weight_region.plan_layout`, `fill_region`), and puts the allocation's IPC handle in the version's
`Manifest`. vLLM's worker (`weight_region.read_region`) opens the handle, verifies the checksums, and loads
from device memory: the bytes cross PCIe once, pinned, instead of host -> /dev/shm -> pageable copy to the GPU.
The region lives until the trainer's ONLOAD (`release`), when vLLM has loaded it or is gone: the engine starts
vLLM once the region is registered, so vLLM sizes its KV cache with the region in place and freeing it
earlier would give vLLM nothing.

Sharing goes through torch's own CUDA IPC (`storage._share_cuda_`, `rebuild_cuda_tensor`). torch counts one
reader per share (a counter in a shared file that the share sets to 1 and each opener's release takes 1 from)
and keeps a freed block while the count is above 0; here a version is read again by a vLLM restarted during
ROLLOUT, and a vLLM killed while loading never gives its count back. So the writer shares each region once and
clears the count itself before it frees the region (`release`): the phases guarantee that by ONLOAD every
reader has loaded or is gone (a worker drops its views once loaded). Needs both processes on one node with the
same IPC namespace (containers: `--ipc=host`) and the GPU visible to both; the GPU is named by UUID, since
each process numbers the GPUs it sees. One vLLM worker only (`parallel.vllm_tp=1`): more would each open a
CUDA context on the trainer's GPU after vLLM sized its KV cache, so the config refuses them. GPU only: on a
CPU machine `transfer.local=auto` is shared memory and `cuda_ipc` is refused.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping

import torch

from checkpoint_engine.contracts.weight_region import (
    SHM_DIR,
    DeviceHandle,
    Manifest,
    fill_region,
    plan_layout,
    region_name,
)

log = logging.getLogger(__name__)


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int:
    """This process's index of the GPU with `uuid`."""
    seen = [device_uuid(i) for i in range(torch.cuda.device_count())]
    if uuid not in seen:
        raise RuntimeError(
            f"the weight region is on GPU {uuid}, which this process cannot see (it sees {seen}): the trainer "
            "and vLLM need the same GPUs visible (CUDA_VISIBLE_DEVICES, the containers' devices)"
        )
    return seen.index(uuid)


def share(region: torch.Tensor) -> DeviceHandle:
    """The IPC handle of a uint8 region on a GPU (torch keeps the memory until every opener dropped it)."""
    storage = region.untyped_storage()
    device, handle, size, offset, counter, counter_offset, event, sync = storage._share_cuda_()
    return DeviceHandle(
        device_uuid=device_uuid(device),
        handle=handle.hex(),
        size=size,
        offset=offset,
        ref_counter=counter.hex(),
        ref_counter_offset=counter_offset,
        event=event.hex(),
        event_sync_required=sync,
    )


def open_region(h: DeviceHandle) -> torch.Tensor:
    """The region another process on this node shared, as a uint8 tensor on this process's view of its GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        (h.size,),
        (1,),
        0,
        torch.UntypedStorage,
        torch.uint8,
        local_index(h.device_uuid),
        bytes.fromhex(h.handle),
        h.size,
        h.offset,
        False,
        bytes.fromhex(h.ref_counter),
        h.ref_counter_offset,
        bytes.fromhex(h.event),
        h.event_sync_required,
    )


# torch's reader counts are int64 slots of a POSIX shared-memory file its RefcountedMapAllocator made, whose
# data begins after a 64-byte header (the file's own reference count, which must be left alone).
COUNTER_HEADER = 64


def clear_readers(h: DeviceHandle) -> None:
    """Set torch's count of `h`'s readers to 0, so that freeing the region frees it now (see the module's doc)."""
    path = SHM_DIR / bytes.fromhex(h.ref_counter).decode().lstrip("/")
    at = COUNTER_HEADER + 8 * h.ref_counter_offset
    try:
        with path.open("r+b") as f:
            if f.seek(0, 2) < at + 8:
                raise ValueError(f"{path} has no reader count at byte {at}: not a torch CUDA IPC counter file")
            f.seek(at)
            f.write(struct.pack("=q", 0))
    except FileNotFoundError:
        log.warning("torch's reader count of a weight region (%s) is gone; its GPU memory may stay reserved", path)


class DeviceRegionWriter:
    """The EXPORT side of `transfer.local=cuda_ipc`: each version in a device region this writer holds.

    `share` is injectable so that the layout, checksums and release logic are tested on a CPU.
    """

    def __init__(
        self,
        job: str,
        node: str,
        device: torch.device | None = None,
        share: Callable[[torch.Tensor], DeviceHandle] = share,
    ) -> None:
        self.job, self.node, self._share = job, node, share
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._regions: dict[int, tuple[torch.Tensor, DeviceHandle]] = {}

    def write(self, version: int, tensors: Mapping[str, torch.Tensor]) -> Manifest:
        """Copy `tensors` into a new device region for `version`; fails if this writer holds that version."""
        if version in self._regions:
            raise FileExistsError(f"weight version {version} already has a device region on {self.node}")
        slots, size = plan_layout(tensors)
        region = torch.empty(size, dtype=torch.uint8, device=self.device)
        slots = fill_region(region, slots, tensors)
        if region.is_cuda:
            torch.cuda.synchronize(self.device)  # the copies are queued; vLLM must read them whole
        handle = self._share(region)
        self._regions[version] = (region, handle)
        name = region_name(self.job, self.node, version)
        return Manifest(region=name, version=version, size=size, slots=tuple(slots), device=handle)

    def versions(self) -> list[int]:
        return sorted(self._regions)

    def discard(self, version: int) -> None:
        """Free a version that was never registered (an EXPORT that failed part way)."""
        self._free(version)

    def release(self) -> None:
        """Free every region before ONLOAD: vLLM has loaded them (or was killed), training needs the memory."""
        for version in list(self._regions):
            self._free(version)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.ipc_collect()  # a block torch kept back while counting readers goes now
            torch.cuda.empty_cache()

    def _free(self, version: int) -> None:
        held = self._regions.pop(version, None)
        if held is not None:
            clear_readers(held[1])  # the region itself goes with `held`'s last reference

    def close(self) -> None:
        self.release()
