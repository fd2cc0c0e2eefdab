"""What each phase's owner reports when it completes a phase: one typed payload per phase.

The payload travels as JSON (HTTP to the node's engine, then the ack record in etcd) and is read
back by the controller for the iteration's metrics. Every payload carries `schema`; a reader
refuses one it does not know, and a misspelt field is an error rather than a silent zero.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from checkpoint_engine.contracts.message import Message
from checkpoint_engine.contracts.phases import Phase


class AckPayload(Message):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


class MetricsAck(AckPayload):
    """TRAIN (the trainer's `train/*` and `logprob_gap/*`) and ROLLOUT (the controller's `reward/*`)."""

    metrics: dict[str, float] = Field(default_factory=dict)


class MoveAck(AckPayload):
    """OFFLOAD and ONLOAD: what moved off (or back onto) the accelerator and what stayed."""

    seconds: float
    bytes_moved: int = 0
    device_bytes_after: int = 0  # accelerator memory still allocated by torch's tensors (CUDA); 0 on CPU
    # The rank's whole GPU in use as the driver sees it (CUDA context, allocator cache, NCCL, other processes):
    # after OFFLOAD, what vLLM cannot have. 0 on CPU.
    device_bytes_in_use: int = 0
    device_bytes_in_use_before: int = 0  # the same when the move began: after TRAIN for OFFLOAD
    host_rss_bytes: int = 0


class ExportAck(AckPayload):
    """EXPORT on a node with a trainer: the producer's timings and the region it registered."""

    weight_version: int
    convert_seconds: float = 0.0
    push_seconds: float = 0.0
    push_gb_per_s: float = 0.0
    cold_start_seconds: float = 0.0  # the first EXPORT of a fresh run also waited for the cold start
    region: str = ""  # filled in by the engine that registered it
    bytes: int = 0
    on_device: bool = False  # the region is in GPU memory, shared by CUDA IPC (transfer.local=cuda_ipc)


class ExportWaitAck(AckPayload):
    """EXPORT on a node without a trainer: which nodes' registrations it waited for."""

    registered_by: list[str]


class StartVllmAck(AckPayload):
    pid: int | None
    seconds: float  # from the fork request to healthy (the zygote's imports ran before, during TRAIN)
    waited_seconds: float = 0.0  # START_VLLM's own wait when the start-up began during EXPORT
    # The sidecar's own breakdown: the zygote's imports and compiles (first start only), the fork, the build.
    import_seconds: float = 0.0
    compile_seconds: float = 0.0
    fork_seconds: float = 0.0
    build_seconds: float = 0.0
    kept_alive: bool = False  # rollout.lifecycle=keep_alive: the vLLM of the last rollout serves again
    retries: int = 0  # starts that failed before this one (phase.vllm_start_attempts)
    device_free_bytes: list[int] = Field(default_factory=list)  # per GPU (NVML) before vLLM started; empty without NVML


class RestartVllmAck(AckPayload):
    """Not a phase's ack: the engine's answer to POST /vllm/restart, when vLLM died during ROLLOUT."""

    pid: int | None
    start_seconds: float
    load_seconds: float
    weight_version: int  # loaded again from the node's verified region
    retries: int = 0  # starts that failed before the one that worked


class UpdateWeightsAck(AckPayload):
    weight_version: int
    load_seconds: float


class TerminateVllmAck(AckPayload):
    pids: list[int]
    rss_freed_bytes: int  # resident memory of the tree just before the kill, gone with it
    killed: bool  # SIGKILL was needed (it always is: a retired vLLM is killed at once)
    seconds: float = 0.0  # signal to every pid of the tree gone
    kept_alive: bool = False  # rollout.lifecycle=keep_alive: vLLM stays up for the next rollout
    slept: int = 0  # the sleep level it was put to (rollout.sleep_level, GPU); `seconds` is then the sleep's
    device_free_bytes: list[int] = Field(
        default_factory=list
    )  # per GPU (NVML) once vLLM's tree is gone; empty without NVML


_BY_PHASE: dict[Phase, tuple[type[AckPayload], ...]] = {
    Phase.TRAIN: (MetricsAck,),
    Phase.OFFLOAD: (MoveAck,),
    Phase.EXPORT: (ExportAck, ExportWaitAck),
    Phase.START_VLLM: (StartVllmAck,),
    Phase.UPDATE_WEIGHTS: (UpdateWeightsAck,),
    Phase.ROLLOUT: (MetricsAck,),
    Phase.TERMINATE_VLLM: (TerminateVllmAck,),
    Phase.ONLOAD: (MoveAck,),
}


def parse_ack(phase: Phase, payload: dict[str, Any]) -> AckPayload:
    """The typed payload of an ack of `phase`; ValueError names the phase and what was wrong."""
    if phase not in _BY_PHASE:
        raise ValueError(f"{phase.value} has no ack payload")
    errors = []
    for kind in _BY_PHASE[phase]:
        try:
            return kind.model_validate(payload)
        except ValueError as e:
            errors.append(f"{kind.__name__}: {e}")
    raise ValueError(f"ack payload of {phase.value} is not understood: {'; '.join(errors)}")


def check_ack(phase: Phase, payload: AckPayload) -> None:
    """Refuse a payload of the wrong kind for `phase` (the sender's mistake, named at the sender)."""
    if not isinstance(payload, _BY_PHASE.get(phase, ())):
        kinds = [k.__name__ for k in _BY_PHASE.get(phase, ())]
        raise ValueError(f"an ack of {phase.value} carries {kinds}, not {type(payload).__name__}")
