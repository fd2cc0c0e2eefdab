"""The checkpoint engine's configuration: its sections of the run's config and the document it runs from.

`phase` and `transfer` are sections of the user's config (Hydra keys `phase.*`, `transfer.*`);
`EngineConfig` is what one node's engine process receives as a JSON file (`timeshare engine
<file>`), written by the launcher: the node's place in the job, those sections, and the vLLM
settings of `contracts.vllm_protocol.VllmSettings`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Lifecycle, LocalRegion, Section
from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from checkpoint_engine.etcd_client import parse_endpoint


class PhaseConfig(Section):
    """Timeouts of the phase machine, in seconds, and what a phase checks."""

    KEY = "phase"
    timeout: float = Field(900.0, gt=0)  # how long a barrier waits for every node
    vllm_start_timeout: float = Field(300.0, gt=0)  # until vLLM answers its health check; <= timeout
    vllm_start_attempts: int = Field(3, ge=1)  # a vLLM that dies or stays unhealthy is started again
    ttl: int = Field(10, ge=2)  # node lease in etcd: a node silent this long has failed
    # An engine's etcd requests are tried again while etcd is out of reach for this long (the launcher starts
    # the job's own etcd again on its data directory when it dies); 0: fail at once.
    etcd_outage: float = Field(30.0, ge=0)
    # A node whose lease ran out (crashed, or stalled past `ttl`) is waited for this long to register again and
    # do its part before the phase fails naming it; 0: fail at once.
    node_grace: float = Field(30.0, ge=0)
    # GPUs (NVML): TERMINATE_VLLM fails, naming the process, when a GPU has more than this much more memory in
    # use once vLLM's tree is gone than before it started; without NVML (a CPU machine) nothing is checked.
    device_margin_gib: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _start_within_timeout(self) -> PhaseConfig:
        if self.vllm_start_timeout > self.timeout:
            raise ConfigError(
                f"phase.vllm_start_timeout ({self.vllm_start_timeout}) must be <= phase.timeout ({self.timeout}): "
                "the START_VLLM barrier would give up first"
            )
        return self


class TransferConfig(Section):
    """How weights reach a node's vLLM: shared memory or CUDA IPC on the node; Mooncake's TransferEngine from
    others."""

    KEY = "transfer"
    kind: Literal["shm", "mooncake"] = "shm"
    protocol: Literal["tcp", "rdma"] = "tcp"  # Mooncake's transport between nodes
    # The trainer's export for its own node's vLLM (contracts.config.LocalRegion; the launcher resolves auto,
    # `TrainConfig.local_region`). cuda_ipc keeps the version in GPU memory from EXPORT to ONLOAD, so vLLM's
    # gpu_memory_utilization must leave room for one copy of the weights; Mooncake serves shared memory only,
    # so a job of several nodes exports there.
    local: LocalRegion = "auto"

    @model_validator(mode="after")
    def _protocol_needs_mooncake(self) -> TransferConfig:
        if self.kind == "shm" and self.protocol != "tcp":
            raise ConfigError(
                f"transfer.protocol={self.protocol!r} applies to transfer.kind='mooncake' only; leave it at 'tcp'"
            )
        if self.kind == "mooncake" and self.local == "cuda_ipc":
            raise ConfigError(
                "transfer.local='cuda_ipc' keeps the export in GPU memory, which Mooncake cannot serve to other "
                "nodes: with transfer.kind='mooncake' set transfer.local to 'shm' or 'auto'"
            )
        return self

    @property
    def exports_on_device(self) -> bool:
        """The node's version is in the trainer's GPU memory (as the launcher resolved `local`)."""
        return self.local == "cuda_ipc"


class EngineConfig(Section):
    """One node's checkpoint engine: who it is in the job, where etcd is, and how it runs vLLM."""

    KEY = "engine"
    node: str
    job: str
    etcd: str  # HOST:PORT
    nodes: tuple[str, ...] = Field(strict=False)  # every node of the job: the barriers wait for all of them
    weights_from: tuple[str, ...] = Field((), strict=False)  # nodes whose exports this node loads (no trainer)
    start_iteration: int = Field(0, ge=0)  # > 0: a resumed run restarts at EXPORT of this iteration
    log_dir: str  # vLLM's log goes here
    # A directory where the node's vLLM container runs its zygote (`timeshare vllm-zygote DIR`); None: the
    # engine spawns its own.
    vllm_zygote: str | None = None
    host: str = "127.0.0.1"  # the engine's HTTP API
    port: int = Field(ge=1, le=65535)
    token: str | None = None  # bearer token; required when `host` is not loopback
    lifecycle: Lifecycle  # rollout.lifecycle: kill vLLM after each rollout, or not
    sleep_level: int = Field(0, ge=0, le=2)  # rollout.sleep_level: keep_alive's vLLM sleeps between rollouts
    phase: PhaseConfig
    transfer: TransferConfig
    vllm: VllmSettings

    @model_validator(mode="after")
    def _job_shape(self) -> EngineConfig:
        try:
            parse_endpoint(self.etcd)
        except ValueError as e:
            raise ConfigError(f"engine.etcd: {e}") from e
        if self.node not in self.nodes:
            raise ConfigError(f"engine.node {self.node!r} is not among engine.nodes {list(self.nodes)}")
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"engine.nodes has duplicates: {list(self.nodes)}")
        strangers = [n for n in self.weights_from if n not in self.nodes or n == self.node]
        if strangers:
            raise ConfigError(f"engine.weights_from {strangers} must name other nodes of {list(self.nodes)}")
        if len(self.nodes) > 1 and self.transfer.kind != "mooncake":
            raise ConfigError("a job with several nodes needs a transport between them: set transfer=mooncake")
        return self
