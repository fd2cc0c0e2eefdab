"""Messages between the checkpoint engine / controller and the vLLM sidecar (HTTP JSON bodies).

Every message carries `schema`; a receiver refuses a schema it does not know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import Dtype, Section
from checkpoint_engine.contracts.message import Message

# Why a trajectory stopped, in one vocabulary for the sidecar, the replay buffer and the rewards.
# The generator reports stop (a stop token), length (max_tokens or the context is full), repeat (the
# repeat detector) and aborted (cut off before finishing); the replay buffer turns a `length` that
# only used this iteration's budget into `length_budget` (unfinished, continued next iteration).
FinishReason = Literal["stop", "length", "length_budget", "repeat", "aborted"]
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "length_budget", "repeat", "aborted")
UNFINISHED: frozenset[str] = frozenset({"length_budget", "aborted"})
GENERATOR_FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "repeat", "aborted")


LoadFormat = Literal["dummy", "auto", "safetensors"]


class VllmSettings(Section):
    """How the sidecar starts vLLM: what the engine hands it as one JSON file (`server.py <file>`).
    Every value comes from the run's config (the launcher fills it in); nothing here has a second default."""

    KEY = "engine.vllm"
    model_dir: str  # HF directory: config and tokenizer; the weights are pushed after a dummy start
    port: int = Field(ge=1, le=65535)
    tensor_parallel: int = Field(ge=1)
    gpu_memory_utilization: float = Field(gt=0, le=0.95)  # host memory on CPU; unused with kv_cache_bytes
    kv_cache_bytes: int | None = Field(default=None, gt=0)  # explicit KV cache: vLLM skips its sizing
    max_model_len: int = Field(ge=1)
    dtype: Dtype
    seed: int = Field(ge=0)
    host: str = "127.0.0.1"
    load_format: LoadFormat = "dummy"  # dummy: the weights come by push
    sleep_mode: bool = False  # vLLM's sleep mode (CUDA only): POST /sleep and /wake_up (rollout.sleep_level)


class GenerationRequest(Message):
    """One prompt (or prompt + partial response, to continue it) and how to sample it."""

    prompt_ids: list[int] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Stop with finish reason "repeat" once the output ends in an n-gram (n <= repeat_max_ngram)
    # repeated repeat_min_repeats times back to back; 0 and 0: no detection.
    repeat_max_ngram: int = Field(default=0, ge=0)
    repeat_min_repeats: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _repeat_both_or_neither(self) -> Self:
        if self.repeat_max_ngram and self.repeat_min_repeats < 2:
            raise ValueError(
                f"repeat_min_repeats must be >= 2 with repeat_max_ngram set, got {self.repeat_min_repeats}"
            )
        return self


class GenerateBody(Message):
    requests: list[GenerationRequest]


class Completion(Message):
    """One sampled continuation of a request's prompt (a task's prompt is `engine.tasks.Sample`)."""

    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the sampling distribution
    finish_reason: FinishReason
    weight_version: int


class GenerationResult(Message):
    samples: list[Completion]


class GenerateResponse(Message):
    results: list[GenerationResult]
    seconds: float  # inside vLLM's generate call: the rest of the request's time is serving


class UpdateWeightsBody(Message):
    manifest: dict[str, Any]  # checkpoint_engine.contracts.weight_region.Manifest.to_dict()


class UpdateWeightsResponse(Message):
    weight_version: int
    seconds: float


class StartupTimes(Message):
    """Where the sidecar's start-up went, in seconds (`sidecars/vllm/zygote.py`)."""

    # Paid once per zygote (reported by its first sidecar) or by a sidecar started on its own:
    imports: float = 0.0  # torch, vLLM and the web stack, from the process's first line
    compile: float = 0.0  # torch.compile of vLLM's sampler helpers (see sidecars/vllm/llm.py)
    # Paid by every sidecar:
    fork: float = 0.0  # from the engine's request to the forked sidecar running (0 without a zygote)
    build: float = 0.0  # vLLM's LLM with dummy weights: model init, KV cache, warm-up


class Health(Message):
    status: Literal["ok"] = "ok"
    pid: int
    weight_version: int
    model: str
    startup: StartupTimes
    asleep: int = 0  # the sleep level it is at (POST /sleep), 0: awake


class SleepBody(Message):
    level: int = Field(ge=1, le=2)  # 1: weights to host memory, KV cache freed; 2: both discarded


class SleepResponse(Message):
    """POST /sleep and /wake_up."""

    asleep: int
    seconds: float


class ForkRequest(Message):
    """What an engine asks a vLLM zygote for: a sidecar that serves with these settings, writes to this log and
    dies with this engine (a zygote in a container of its own outlives engines)."""

    engine_pid: int = Field(ge=1)
    settings: str  # a VllmSettings JSON file, read after the fork: a restarted engine's new ports apply
    log: str  # the sidecar's stdout and stderr, appended


@dataclass(frozen=True)
class ZygoteFiles:
    """The files through which an engine and its vLLM zygote talk, named after `prefix`, in a directory both
    see: the engine's log directory when it spawns the zygote, a shared volume when the zygote runs in a
    container of its own (`timeshare vllm-zygote DIR`). Both share the node's PID namespace and /dev/shm."""

    prefix: Path

    @property
    def settings(self) -> Path:  # the engine writes it; a zygote of its own waits for it before its compiles
        return self.prefix.with_suffix(".json")

    @property
    def request(self) -> Path:  # a ForkRequest, written whole by the engine, taken by the zygote
        return self.prefix.with_suffix(".fork")

    @property
    def sidecar_pid(self) -> Path:  # the zygote writes the pid of the sidecar it forked for the last request
        return self.prefix.with_suffix(".pid")

    @property
    def zygote_pid(self) -> Path:  # the zygote writes its own pid when it starts
        return self.prefix.with_suffix(".zygote")

    def ask(self, request: ForkRequest) -> None:
        self.sidecar_pid.unlink(missing_ok=True)
        write_atomically(self.request, request.model_dump_json())

    def take(self) -> ForkRequest | None:
        """The pending request, removed; None when there is none."""
        try:
            text = self.request.read_text()
        except FileNotFoundError:
            return None
        self.request.unlink(missing_ok=True)
        return ForkRequest.model_validate_json(text)

    @staticmethod
    def read_pid(path: Path) -> int | None:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None


def write_atomically(path: Path, text: str) -> None:
    """A reader polling for `path` sees all of `text` or nothing."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.rename(path)
