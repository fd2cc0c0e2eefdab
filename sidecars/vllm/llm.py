"""Build the in-process vLLM `LLM` for rollouts from the sidecar's settings, with dummy weights by default.

Must be called under `if __name__ == "__main__":` (vLLM spawns its engine-core process).
On CPU, `gpu_memory_utilization` is a fraction of host memory used for the KV cache.
"""

from __future__ import annotations

import os

from checkpoint_engine.contracts.vllm_protocol import VllmSettings

EXTENSION = "sidecars.vllm.worker_extension.WeightReceiverExtension"


def configure_vllm(settings: VllmSettings) -> None:
    """vLLM's environment, set before it is imported."""
    # Keep vLLM's CPU worker to the cores it is given instead of pinning all of them.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if settings.tensor_parallel == 1:
        # The engine core and the worker in this process: each would otherwise be a fresh process
        # importing torch and vLLM again (about 7 s each on CPU), which a restart every iteration pays.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def start_llm(settings: VllmSettings):  # -> vllm.LLM
    configure_vllm(settings)
    from vllm import LLM

    return LLM(
        model=settings.model_dir,
        load_format=settings.load_format,
        tensor_parallel_size=settings.tensor_parallel,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        dtype=settings.dtype,
        enforce_eager=True,
        enable_prefix_caching=True,
        worker_extension_cls=EXTENSION,
        # Logprobs of the distribution actually sampled from (temperature and top-p applied), the
        # quantity the trainer's importance ratios and the logprob-gap check compare against.
        logprobs_mode="processed_logprobs",
    )
