"""One iteration's record as the controller sees it: the seconds of each phase and what its acks report.

Consumes the end of each phase in table order (`IterationRecord.done`, with that phase's acks) on one
clock that runs across iterations, so a phase lasts from the end of the one before it to its own end.
Produces the iteration's `time/<phase>` and the acks' numbers (`push/*`, `vllm/*`, `train/*`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from checkpoint_engine.contracts.acks import (
    AckPayload,
    ExportAck,
    MetricsAck,
    MoveAck,
    StartVllmAck,
    TerminateVllmAck,
    UpdateWeightsAck,
)
from checkpoint_engine.contracts.phases import Phase


@dataclass
class PhaseClock:
    """The controller's clock of the job: the end of the last phase it saw done."""

    now: Callable[[], float]
    last_end: float = field(init=False)

    def __post_init__(self) -> None:
        self.last_end = self.now()

    def lap(self) -> float:
        """Seconds since the last phase ended; this one ends now."""
        end = self.now()
        seconds, self.last_end = max(end - self.last_end, 0.0), end
        return seconds


@dataclass
class IterationRecord:
    iteration: int
    clock: PhaseClock
    first: bool  # the run's (or the resumed run's) first iteration: it begins at EXPORT, after the start-up
    metrics: dict[str, float] = field(default_factory=dict)

    def done(self, phase: Phase, payloads: dict[str, AckPayload]) -> None:
        """`phase` ended now; `payloads`: each node's ack of it, by node."""
        seconds = self.clock.lap()
        self.metrics[f"time/{phase.value.lower()}"] = seconds
        self.metrics.update(ack_metrics(phase, payloads))
        export = payloads and next(iter(payloads.values()))
        if self.first and phase is Phase.EXPORT and isinstance(export, ExportAck):
            self.metrics.update(startup_split(seconds, export))


def startup_split(seconds: float, export: ExportAck) -> dict[str, float]:
    """The first EXPORT also waited for the trainer to start and do the cold start: report those apart, so
    that time/export means the same thing in every iteration."""
    work = export.convert_seconds + export.push_seconds
    waited = seconds - work - export.cold_start_seconds
    return {"time/startup": max(waited, 0.0), "time/export": work}


def ack_metrics(phase: Phase, payloads: dict[str, AckPayload]) -> dict[str, float]:
    """The numbers worth logging from the acks of `phase`: the first node's (sorted), and for
    UPDATE_WEIGHTS the version each node's vLLM loaded."""
    if not payloads:
        return {}
    first = next(iter(payloads.values()))
    metrics = _payload_metrics(phase, first)
    if phase is Phase.UPDATE_WEIGHTS:
        for node, loaded in payloads.items():
            if isinstance(loaded, UpdateWeightsAck):
                metrics[f"vllm/weight_version/{node}"] = float(loaded.weight_version)
    return metrics


def train_metrics(payload: MetricsAck) -> dict[str, float]:
    """What TRAIN's report holds for the iteration's record (also read back from a checkpoint on resume)."""
    return {k: v for k, v in payload.metrics.items() if k.startswith(("train/", "logprob_gap/"))}


def _payload_metrics(phase: Phase, payload: AckPayload) -> dict[str, float]:
    if phase is Phase.TRAIN and isinstance(payload, MetricsAck):
        return train_metrics(payload)
    if isinstance(payload, ExportAck):
        cold = {"time/cold_start": payload.cold_start_seconds} if payload.cold_start_seconds else {}
        return {
            "push/gb_per_s": payload.push_gb_per_s,
            "push/bytes": float(payload.bytes),
            "push/cuda_ipc": float(payload.on_device),
            "export/convert_seconds": payload.convert_seconds,  # Megatron -> HF tensors, before the region write
            "push/weight_version": float(payload.weight_version),
            **cold,
        }
    if phase is Phase.OFFLOAD and isinstance(payload, MoveAck):
        on_gpu = payload.device_bytes_in_use > 0  # a CUDA context alone holds some
        left = {
            "offload/device_bytes_before": float(payload.device_bytes_in_use_before),
            "offload/device_bytes_left": float(payload.device_bytes_in_use),
            "offload/device_bytes_allocated": float(payload.device_bytes_after),
        }
        return {"offload/bytes_moved": float(payload.bytes_moved), **(left if on_gpu else {})}
    if isinstance(payload, StartVllmAck):  # the start-up's parts: the zygote's imports and compiles, fork, build
        return {
            "vllm/import_seconds": payload.import_seconds,
            "vllm/compile_seconds": payload.compile_seconds,
            "vllm/fork_seconds": payload.fork_seconds,
            "vllm/build_seconds": payload.build_seconds,
            "vllm/start_seconds": payload.seconds,
            "vllm/start_retries": float(payload.retries),
            **_per_gpu("device/free_bytes_before_vllm", payload.device_free_bytes),
        }
    if isinstance(payload, TerminateVllmAck):
        return {
            "vllm/kill_seconds": payload.seconds,
            "vllm/rss_freed_bytes": float(payload.rss_freed_bytes),
            **({"vllm/sleep_level": float(payload.slept)} if payload.slept else {}),
            **_per_gpu("device/free_bytes_after_vllm", payload.device_free_bytes),
        }
    return {}


def _per_gpu(name: str, values: list[int]) -> dict[str, float]:
    return {f"{name}/gpu{i}": float(v) for i, v in enumerate(values)}
