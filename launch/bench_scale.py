"""`timeshare bench scale`: the switch at Qwen2.5-0.5B and -1.5B shapes, phase by phase, on this machine.

For each shape and dtype: a model of that shape with random weights (Qwen2 architecture, tied
embeddings, vocabulary 151936, the project's BPE tokenizer) is written locally, then the real job
(`timeshare train`: etcd, checkpoint engine, a Megatron rank, vLLM with dummy weights) runs on it
with `run.mode=rollout_only` (TRAIN leaves the weights, so no gradients or optimizer state share
the host with vLLM) and a few short rollouts. One JSON line per measure, from the iterations after
the first (means), all from this one invocation (only same-run ratios mean something here):
- `memcpy`: a copy of the model's bytes into memory touched before, the EXPORT's baseline;
- `export`: Megatron -> HF tensors -> the shared-memory region (GB/s, and its ratio to memcpy; the
  conversion's seconds, and the region write's GB/s with its checksums);
- `start_vllm`: a vLLM with dummy weights forked and serving; `update_weights`: the pushed version
  verified and loaded into it (GB/s); `terminate_vllm`: vLLM killed and the memory its processes
  held (`rss_freed_bytes`); `offload`/`onload`: the trainer's state off and back;
- `train_step`: one `Trainer.train_on` of the job's own rollout batch (GRPO) in a rank of its own,
  its seconds and the rank's peak RSS (parameters, gradients, Adam's moments and the forward);
- `skipped`: a case whose estimated memory exceeds what this host has free, with the estimate.
On CPU OFFLOAD frees nothing (host and device are one memory): the trainer's weights, the region and
vLLM's copy are all resident during UPDATE_WEIGHTS, which is what bounds the size here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from checkpoint_engine.contracts.run_dir import RunPaths
from launch.bench_cycle import SWITCH, later_iterations, read_rows, run_job

SHAPES = {  # Qwen2.5's published shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B)
    "0.5b": {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864},
    "1.5b": {"layers": 28, "hidden": 1536, "heads": 12, "kv_heads": 2, "intermediate": 8960},
}
VOCAB = 151936
GIB = 2**30
RUNTIME_BYTES = 4 * GIB  # etcd, the controller, the engine, torch and vLLM themselves, the KV cache
JOB = [
    "task=addition",
    "run.mode=rollout_only",
    "run.iterations=2",
    "run.eval_every=1000",
    "run.checkpoint_every=1000",  # the last iteration's only: the run's final model
    "task.pool_size=40",
    "task.heldout_size=2",
    "trainer.cold_start.fraction=0",
    "rollout.prompts_per_iteration=2",
    "rollout.group_size=2",
    "rollout.eval_samples=1",
    "rollout.max_response_tokens=8",
    "rollout.iteration_token_budget=8",
    "rollout.max_model_len=256",
    "rollout.kv_cache_gib=0.25",
]


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "scale", **record}), flush=True)


def write_random_model(out: Path, shape: dict[str, int], dtype: torch.dtype) -> int:
    """An HF Qwen2 directory of `shape` (see SHAPES) with random weights (norms at one); returns the weights' bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine.tiny_model import TinyModelSpec, build_tokenizer, hf_config

    spec = TinyModelSpec(
        arch="qwen2", tokenizer="bpe", tie_embeddings=True, vocab_multiple=VOCAB, max_positions=512, **shape
    )
    tokenizer = build_tokenizer(spec)
    config = hf_config(spec, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    names = {n: t.shape for n, t in model.state_dict().items()}
    names.pop("lm_head.weight", None)  # tied to the embedding
    gen = torch.Generator().manual_seed(0)
    tensors = {
        n: torch.ones(s, dtype=dtype) if n.endswith("norm.weight") else (torch.randn(s, generator=gen) * 0.02).to(dtype)
        for n, s in names.items()
    }
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memcpy_gb_per_s(nbytes: int, repeats: int = 3) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # touched, as a recycled region's pages are
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def train_step(model_dir: Path, batch: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    out = subprocess.run(
        [*cmd, "-m", "launch.bench_scale_train", str(model_dir), str(batch), dtype],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the TRAIN step exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_case(shape: str, dtype: str, root: Path) -> None:
    torch_dtype = getattr(torch, dtype)
    params = parameter_count(SHAPES[shape])
    nbytes = params * torch_dtype.itemsize
    case = {"shape": shape, "dtype": dtype, "params": params, "bytes": nbytes}
    # The job holds the trainer's weights, the region and vLLM's copy at once; the TRAIN step holds
    # weights, gradients and Adam's two moments, with the checkpoint's tensors while it loads.
    need = {"job": 3 * nbytes + RUNTIME_BYTES, "train_step": 5 * nbytes + RUNTIME_BYTES // 2}
    if not _fits(case, "job", need["job"]):
        return
    _emit(**case, measure="memcpy", gb_per_s=round(memcpy := memcpy_gb_per_s(nbytes), 3))
    model_dir = root / "model"
    start = time.perf_counter()
    written = write_random_model(model_dir, SHAPES[shape], torch_dtype)
    assert written == nbytes, (written, nbytes)
    _emit(**case, measure="write_model", seconds=round(time.perf_counter() - start, 1))

    runs = root / "runs"
    runs.mkdir()
    run_dir = run_job(f"{shape}-{dtype}", [*JOB, f"model.path={model_dir}", f"model.dtype={dtype}"], runs)
    later = later_iterations(f"{shape} {dtype}", read_rows(run_dir))

    def mean(key: str) -> float:
        return sum(r[key] for r in later) / len(later)

    pushed = mean("push/bytes")
    export = mean("time/export")
    _emit(**case, measure="export", seconds=round(export, 3), gb_per_s=round(pushed / export / 1e9, 3),
          vs_memcpy=round(pushed / export / 1e9 / memcpy, 3), convert_seconds=round(mean("export/convert_seconds"), 3),
          region_write_gb_per_s=round(mean("push/gb_per_s"), 3))  # fmt: skip
    _emit(**case, measure="start_vllm", seconds=round(mean("time/start_vllm"), 3))
    update = mean("time/update_weights")
    _emit(**case, measure="update_weights", seconds=round(update, 3), gb_per_s=round(pushed / update / 1e9, 3))
    _emit(**case, measure="terminate_vllm", seconds=round(mean("time/terminate_vllm"), 3),
          rss_freed_bytes=int(mean("vllm/rss_freed_bytes")))  # fmt: skip
    for phase in ("offload", "onload"):
        _emit(**case, measure=phase, seconds=round(mean(f"time/{phase}"), 3))
    switch = sum(mean(f"time/{p}") for p in SWITCH)
    _emit(**case, measure="switch", seconds=round(switch, 3), iterations=len(later))

    if not _fits(case, "train_step", need["train_step"]):
        return
    batch = RunPaths(run_dir).batch(int(later[0]["iteration"]))
    _emit(**case, measure="train_step", **train_step(model_dir, batch, dtype))


def _fits(case: dict, what: str, need: int) -> bool:
    """Whether `need` bytes are free; if not, a `skipped` line says so."""
    free = psutil.virtual_memory().available
    if need <= free:
        return True
    _emit(**case, measure="skipped", what=what, need_gib=round(need / GIB, 1), free_gib=round(free / GIB, 1))
    return False


def parameter_count(s: dict[str, int]) -> int:
    """Parameters of a Qwen2 of shape `s` with tied embeddings and the vocabulary VOCAB."""
    head_dim = s["hidden"] // s["heads"]
    q_kv = 2 * s["heads"] + 2 * s["kv_heads"]  # q and o, k and v
    attention = s["hidden"] * head_dim * q_kv + head_dim * (s["heads"] + 2 * s["kv_heads"])  # weights, qkv bias
    mlp = 3 * s["hidden"] * s["intermediate"]
    return VOCAB * s["hidden"] + s["layers"] * (attention + mlp + 2 * s["hidden"]) + s["hidden"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    for shape in args.shapes:
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory(prefix=f"timeshare-bench-scale-{shape}-{dtype}-") as tmp:
                bench_case(shape, dtype, Path(tmp))
    return 0
