"""Process-group set-up for the trainer ranks: torch.distributed plus Megatron's model-parallel groups.

Reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or the arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sidecars.megatron import compat


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # MoE experts split over this many of the data-parallel ranks (each holds experts / EP of them
    # whole: expert tensor parallelism is 1); the dense layers stay data-parallel over them.
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_parallel > 1 and self.tensor_parallel > 1:
            raise ValueError(
                f"expert_parallel={self.expert_parallel} with tensor_parallel={self.tensor_parallel}: "
                "an MoE trainer here is tensor_parallel=1 (experts split over the data-parallel ranks)"
            )


# How often torchrun started this node's ranks again after one failed (`--max-restarts`); 0 at the first start.
RESTARTS = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _restart_store() -> dist.Store | None:
    """For ranks torchrun started again (`--max-restarts`): their own part of the agent's store. Its static
    rendezvous keeps one store for every start of the ranks and torch does not keep the starts apart in it
    (pytorch/pytorch#135712), so ranks started again found the dead ones' gloo addresses and could not
    connect. None for the first start, which takes torch's default."""
    if not RESTARTS:
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return dist.PrefixStore(f"timeshare/restart{RESTARTS}", agent)


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Join the torchrun group (gloo on CPU, NCCL on GPU) and build Megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    compat.apply_cpu_shims()
    if not dist.is_initialized():
        if compat.on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        restarted = _restart_store()
        if restarted is None:
            dist.init_process_group(backend=compat.distributed_backend())
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=compat.distributed_backend(), store=restarted, rank=rank, world_size=world)
    world = dist.get_world_size()
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel*pipeline_parallel = {model_parallel}")
    data_parallel = world // model_parallel
    if data_parallel % parallel.expert_parallel:
        raise ValueError(
            f"expert_parallel={parallel.expert_parallel} does not divide the {data_parallel} data-parallel ranks"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            expert_model_parallel_size=parallel.expert_parallel,
            expert_tensor_parallel_size=1,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
