"""Build the in-process vLLM `LLM` for rollouts from the sidecar's settings, with dummy weights by default.

Must be called under `if __name__ == "__main__":` (vLLM spawns its engine-core process).
On CPU, `gpu_memory_utilization` is a fraction of host memory used for the KV cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from checkpoint_engine.contracts.vllm_protocol import VllmSettings

EXTENSION = "sidecars.vllm.worker_extension.WeightReceiverExtension"
BATCHED_TOKENS = 4096  # prompt and decode tokens per engine step, raised to max_model_len where that is longer


def configure_vllm(settings: VllmSettings) -> None:
    """vLLM's environment, set before it builds an engine (it reads it then, not when imported)."""
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
        kv_cache_memory_bytes=settings.kv_cache_bytes,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        dtype=settings.dtype,
        enforce_eager=True,
        enable_prefix_caching=True,
        # A prompt is prefilled in one step, never split across steps: on CPU, vLLM's bookkeeping for a
        # split prompt of a seeded request (every rollout request has its seed) fails with "CPU Generator
        # does not use offset". Continued partial rollouts make long prompts that would be split.
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(settings.max_model_len, BATCHED_TOKENS),
        worker_extension_cls=EXTENSION,
        enable_sleep_mode=settings.sleep_mode,
        # Logprobs of the distribution actually sampled from (temperature and top-p applied), the
        # quantity the trainer's importance ratios and the logprob-gap check compare against.
        logprobs_mode="processed_logprobs",
    )


def compile_sampler_ops(settings: VllmSettings) -> None:
    """Compile, before vLLM is built, the sampler helper vLLM wraps in `torch.compile`.

    vLLM's sampler counts each sampled token's rank with a `torch.compile`d function. Its first call in
    a fresh process runs inductor's per-process set-up (ISA probes in subprocesses, the header hash),
    about 1.5-3 s on CPU even when the compiled kernel is in inductor's on-disk cache; a vLLM restarted
    every iteration would pay it inside every rollout. Calling it here, with the model's vocabulary,
    under inference mode (vLLM's grad mode) and with batches of 1, 2 and 3 rows (1 is specialised; 2
    and 3 make the batch dimension dynamic), leaves the compiled code in dynamo's cache for vLLM's
    calls. The kernel itself comes from inductor's cache (`TORCHINDUCTOR_CACHE_DIR`, by default under
    /tmp), shared by every restart.

    It runs on one thread: the zygote forks every sidecar, and at a real vocabulary's size (from about
    500 tokens) the kernel opens OpenMP's thread pool, which a forked child inherits without its
    threads: the sidecar's first parallel torch op then waits for them for ever.
    """
    import torch
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    vocab = json.loads((Path(settings.model_dir) / "config.json").read_text())["vocab_size"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for rows in (1, 2, 3):
                logprobs = torch.zeros(rows, vocab, dtype=torch.float32)
                batched_count_greater_than(logprobs, logprobs[:, :1])
    finally:
        torch.set_num_threads(threads)
