"""`timeshare bench push`: weight-push throughput, one JSON line per result.

Every rate is reported next to a baseline measured in the same run (this machine is shared and
noisy, so only same-run ratios mean something):
- `memcpy` vs `shm_push`: copying a model-sized set of tensors into memory that was touched before,
  against writing them with per-tensor checksums into a shared-memory region that recycles the
  previous version's pages (the steady-state EXPORT path);
- `memcpy_fresh` vs `shm_push_fresh`: the same into never-touched memory (a first EXPORT, or a
  node without a retired region): tmpfs page faults then dominate both;
- `checksum`: xxh3 over the same bytes alone, to show what verification costs;
- `vllm_update_shm` vs `vllm_update_naive`: from tensors in the trainer's memory to the version
  live in a dummy-started vLLM, through the shm buffer (verified) against writing safetensors to
  /dev/shm and reloading from the file.
- `mooncake_tcp_pull` vs `mooncake_copy`: pulling a region through two Mooncake TransferEngines
  over tcp on loopback (the cross-node path, without a network), against a memory copy of it.
Each case is timed `repeats` times, interleaved, and the best time is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from checkpoint_engine.contracts.weight_region import (
    RegionWriter,
    as_bytes,
    checksum,
    remove_region,
    retire_region,
    write_region,
)


def emit(case: str, seconds: float, nbytes: int, **extra: object) -> dict:
    row = {
        "bench": "push",
        "case": case,
        "bytes": nbytes,
        "seconds": round(seconds, 4),
        "gb_per_s": round(nbytes / seconds / 1e9, 3),
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def model_sized_tensors(mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 tensors shaped like a transformer's (a vocab embedding, then attention/MLP matrices)."""
    g = torch.Generator().manual_seed(seed)
    hidden, tensors, total, i = 1024, {}, 0, 0
    tensors["model.embed_tokens.weight"] = torch.randn(32768, hidden, generator=g).to(torch.bfloat16)
    total = tensors["model.embed_tokens.weight"].numel() * 2
    while total < mib << 20:
        for name, shape in (("self_attn.qkv", (3 * hidden, hidden)), ("mlp.up", (4 * hidden, hidden))):
            t = torch.randn(shape, generator=g).to(torch.bfloat16)
            tensors[f"model.layers.{i}.{name}.weight"] = t
            total += t.numel() * 2
        i += 1
    return tensors


def best_of(repeats: int, cases: dict[str, Callable[[], None]]) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class _SteadyExport:
    """Successive versions through one `RegionWriter`, the previous one retired after each write,
    as the weight store does once vLLM has loaded the newer version."""

    def __init__(self) -> None:
        self.writer = RegionWriter(f"bench-{uuid.uuid4().hex[:8]}", "node0")
        self.version, self.previous = 0, None

    def push(self, tensors: dict[str, torch.Tensor]) -> dict:
        self.version += 1
        manifest = self.writer.write(self.version, tensors)
        if self.previous:
            retire_region(self.previous, self.writer.spare)
        self.previous = manifest.region
        return manifest.to_dict()

    def close(self) -> None:
        self.writer.close()
        for name in (self.previous, self.writer.spare):
            if name:
                remove_region(name)


def bench_shm(mib: int, repeats: int) -> None:
    tensors = model_sized_tensors(mib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    fresh_region = f"timeshare-bench-{uuid.uuid4().hex[:8]}"
    touched = np.ones(nbytes, dtype=np.uint8)

    def copy_into(dst: np.ndarray) -> None:
        offset = 0
        for t in tensors.values():
            b = as_bytes(t)
            dst[offset : offset + b.size] = b
            offset += b.size

    def push_fresh() -> None:
        write_region(fresh_region, 1, tensors)
        remove_region(fresh_region)

    flat = np.concatenate([as_bytes(t) for t in tensors.values()])
    steady = _SteadyExport()
    cases = {
        "memcpy": lambda: copy_into(touched),
        "shm_push": lambda: steady.push(tensors),
        "memcpy_fresh": lambda: copy_into(np.empty(nbytes, dtype=np.uint8)),
        "shm_push_fresh": push_fresh,
        "checksum": lambda: checksum(flat),
    }
    try:
        steady.push(tensors), steady.push(tensors)  # both alternating files exist and are mapped
        best = best_of(repeats, cases)
    finally:
        steady.close()
        remove_region(fresh_region)
    emit("memcpy", best["memcpy"], nbytes)
    for case, base in (("shm_push", "memcpy"), ("memcpy_fresh", "memcpy"), ("shm_push_fresh", "memcpy_fresh")):
        emit(case, best[case], nbytes, **{f"ratio_to_{base}": round(best[base] / best[case], 3)})
    emit("checksum", best["checksum"], nbytes, ratio_to_memcpy=round(best["memcpy"] / best["checksum"], 3))


def bench_vllm(layers: int, hidden: int, repeats: int) -> None:
    """Both update paths into one dummy-started vLLM; versions increase so none is refused as stale."""
    from safetensors.torch import save_file

    from checkpoint_engine.contracts.vllm_protocol import VllmSettings
    from engine.tiny_model import TinyModelSpec, write_tiny_model
    from sidecars.megatron.model import read_hf_tensors
    from sidecars.vllm.llm import start_llm

    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyModelSpec(
            layers=layers, hidden=hidden, heads=hidden // 64, kv_heads=hidden // 128, intermediate=hidden * 3
        )
        model_dir = write_tiny_model(Path(tmp) / "model", spec)
        weights = read_hf_tensors(model_dir)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        llm = start_llm(
            VllmSettings(
                model_dir=str(model_dir),
                port=1,
                tensor_parallel=1,
                gpu_memory_utilization=0.15,
                max_model_len=512,
                dtype="float32",
                seed=0,
            )
        )  # in-process: the port is not opened
        steady = _SteadyExport()
        naive_file = f"/dev/shm/timeshare-bench-{uuid.uuid4().hex[:8]}.safetensors"

        def via_shm() -> None:
            llm.collective_rpc("load_region", args=(steady.push(weights),))
            llm.reset_prefix_cache()

        def naive() -> None:
            steady.version += 1  # versions only increase, whichever path loads them
            save_file(weights, naive_file)
            llm.collective_rpc("load_from_safetensors", args=(naive_file, steady.version))
            Path(naive_file).unlink()
            llm.reset_prefix_cache()

        try:
            via_shm(), via_shm()
            best = best_of(repeats, {"vllm_update_shm": via_shm, "vllm_update_naive": naive})
        finally:
            steady.close()
            Path(naive_file).unlink(missing_ok=True)
        emit("vllm_update_naive", best["vllm_update_naive"], nbytes)
        emit(
            "vllm_update_shm",
            best["vllm_update_shm"],
            nbytes,
            speedup_vs_naive=round(best["vllm_update_naive"] / best["vllm_update_shm"], 3),
        )


def bench_mooncake(mib: int, repeats: int) -> None:
    from checkpoint_engine.mooncake_transport import measure_pull_bandwidth

    runs = [measure_pull_bandwidth(mib << 20) for _ in range(repeats)]
    pull, copy = max(r.pull_gbps for r in runs), max(r.copy_gbps for r in runs)
    nbytes = runs[0].nbytes
    emit("mooncake_copy", nbytes / copy / 1e9, nbytes)
    emit(
        "mooncake_tcp_pull",
        nbytes / pull / 1e9,
        nbytes,
        ratio_to_memcpy=round(pull / copy, 3),
        transport="two TransferEngines, tcp over loopback",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench push", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=512, help="size of the tensor set for the shm cases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-layers", type=int, default=8)
    ap.add_argument("--vllm-hidden", type=int, default=1024)
    ap.add_argument("--skip", nargs="*", default=[], choices=["shm", "vllm", "mooncake"])
    args = ap.parse_args(argv)
    if "shm" not in args.skip:
        bench_shm(args.mib, args.repeats)
    if "mooncake" not in args.skip:
        bench_mooncake(args.mib, args.repeats)
    if "vllm" not in args.skip:
        bench_vllm(args.vllm_layers, args.vllm_hidden, args.repeats)
    return 0
