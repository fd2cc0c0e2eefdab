"""Start an in-process vLLM engine for rollouts, with dummy weights by default.

Must be called under `if __name__ == "__main__":` (vLLM spawns its engine-core process).
On CPU, `gpu_memory_utilization` is a fraction of host memory used for the KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

EXTENSION = "sidecars.vllm.worker_extension.WeightReceiverExtension"


@dataclass(frozen=True)
class VllmConfig:
    model_dir: str
    load_format: str = "dummy"
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.15
    max_model_len: int = 512
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.load_format not in ("dummy", "auto", "safetensors"):
            raise ValueError(f"vllm.load_format must be dummy, auto or safetensors, got {self.load_format!r}")
        if not 0.0 < self.gpu_memory_utilization <= 0.95:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 0.95], got {self.gpu_memory_utilization}")


def start_engine(cfg: VllmConfig):  # -> vllm.LLM
    # Keep vLLM's CPU worker to the cores it is given instead of pinning all of them.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM

    return LLM(
        model=cfg.model_dir,
        load_format=cfg.load_format,
        tensor_parallel_size=cfg.tensor_parallel,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        seed=cfg.seed,
        dtype=cfg.dtype,
        enforce_eager=True,
        enable_prefix_caching=True,
        worker_extension_cls=EXTENSION,
        # Logprobs of the distribution actually sampled from (temperature and top-p applied), the
        # quantity the trainer's importance ratios and the logprob-gap check compare against.
        logprobs_mode="processed_logprobs",
    )
