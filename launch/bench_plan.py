"""`timeshare bench plan MODEL_CONFIG --nodes N [N ...] --gpus-per-node G`: the weight push planned for a layout.

MODEL_CONFIG is an HF `config.json` (or a model directory holding one) or a name: `default` (the job's default
model), `qwen2.5-0.5b` or `kimi-k2` (their published configs' shapes, below). One JSON line per node count and
strategy (`checkpoint_engine.push_plan`): buckets, the most bytes a node sends and receives and a link carries,
each stage's time and the predicted seconds of the push.

Bandwidths, GB/s per node: `--source-gbps` (into the sender's buffer: H2D over PCIe Gen5 on a GPU node, 50),
`--link-gbps` (between nodes; default G x `--rail-gbps`, one 400 Gb/s RDMA rail per GPU, 50 each), `--load-gbps`
(into the rollout engine: a CUDA IPC copy in device memory, 400). `--measure` takes them from this machine
instead (the trainer's export into a shm region, a Mooncake tcp pull over loopback and a copy out of the
region, each on 64 MiB) and then runs the first two stages for real on the model's tensor sizes (its export into
a region, a pull of as many bytes): one line `measured` beside the prediction for two nodes of the head
strategy, the one the job runs today.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoint_engine.contracts.weight_region import SHM_DIR, map_region, remove_region, write_region
from checkpoint_engine.push_plan import STRATEGIES, Bandwidths, plan_push
from launch.hf_shapes import DTYPES, parameter_count, tensor_bytes, tensor_shapes

GIB = 2**30
MEASURE_BYTES = 64 << 20
# Best of two: memory this VM never touched before costs ~5x on its first touch (1 GiB exported at 0.37 GB/s the
# first time, 1.9 GB/s the second), which a running job pays once, not at every push.
REPEATS = 2
# Shapes from the published config.json files (Hugging Face: Qwen/Qwen2.5-0.5B, moonshotai/Kimi-K2-Instruct).
PUBLISHED: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "kimi-k2": {
        "model_type": "kimi_k2",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 1,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "num_attention_heads": 64,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 163840,
        "tie_word_embeddings": False,
    },
}


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "plan", **record}), flush=True)


def load_model_config(which: str) -> dict[str, Any]:
    """A config dict from a name (`default`, PUBLISHED), a config.json, or a model directory holding one."""
    if which == "default":
        from engine.tiny_model import build_tokenizer, hf_config
        from launch.config_loading import load_config

        spec = load_config([]).model.tiny_spec(seed=0)
        return hf_config(spec, build_tokenizer(spec)).to_dict()
    if which in PUBLISHED:
        return PUBLISHED[which]
    path = Path(which)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        names = ", ".join(["default", *PUBLISHED])
        raise SystemExit(
            f"timeshare bench plan: {which!r} is neither a config.json, a model directory nor one of {names}"
        )
    return json.loads(path.read_text())


def measured_bandwidths() -> Bandwidths:
    """This machine's stages on MEASURE_BYTES: export into a fresh shm region, Mooncake tcp pull, copy out."""
    source_s = _export_seconds([("probe", MEASURE_BYTES)])[0]
    pull = _pull_gbps(MEASURE_BYTES)
    name = f"timeshare-bench-{uuid.uuid4().hex[:8]}"
    write_region(name, 0, {"probe": _bf16(MEASURE_BYTES)})
    try:
        buf = map_region(SHM_DIR / name, MEASURE_BYTES, create=False)
        start = time.perf_counter()
        torch.from_numpy(np.frombuffer(buf, dtype=np.uint8)).clone()
        load_s = time.perf_counter() - start
        buf.close()
    finally:
        remove_region(name)
    return Bandwidths(source=MEASURE_BYTES / source_s / 1e9, link=pull, load=MEASURE_BYTES / load_s / 1e9)


def _bf16(nbytes: int) -> torch.Tensor:
    """A tensor of (about) `nbytes`, in a dtype a weight region takes."""
    return torch.ones(-(-nbytes // 2), dtype=torch.bfloat16)


def _export_seconds(sizes: Sequence[tuple[str, int]]) -> tuple[float, int]:
    """Seconds to write tensors of these sizes into a fresh region (checksums included), best of REPEATS, and the
    region's bytes."""
    tensors = {name: _bf16(nbytes) for name, nbytes in sizes}
    best, size = float("inf"), 0
    for _ in range(REPEATS):
        name = f"timeshare-bench-{uuid.uuid4().hex[:8]}"
        try:
            start = time.perf_counter()
            size = write_region(name, 0, tensors).size
            best = min(best, time.perf_counter() - start)
        finally:
            remove_region(name)
    return best, size


def _pull_gbps(nbytes: int) -> float:
    from checkpoint_engine.mooncake_transport import measure_pull_bandwidth

    return measure_pull_bandwidth(nbytes, repeats=REPEATS).pull_gbps


def measure_push(sizes: Sequence[tuple[str, int]]) -> dict[str, float]:
    """The head strategy's source and transfer stages for real, on the model's bytes: export, then one pull."""
    source_s, region_bytes = _export_seconds(sizes)
    transfer_s = region_bytes / _pull_gbps(region_bytes) / 1e9
    return {"source_s": round(source_s, 3), "transfer_s": round(transfer_s, 3), "bytes": region_bytes}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="timeshare bench plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="config.json, a model directory, or one of: default, " + ", ".join(PUBLISHED))
    ap.add_argument("--nodes", type=int, nargs="+", default=[2], help="node counts to plan for")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="how the pushed tensors are stored")
    ap.add_argument("--strategy", choices=STRATEGIES, nargs="+", default=list(STRATEGIES))
    ap.add_argument("--bucket-gib", type=float, default=2.0, help="the ring's bucket size")
    ap.add_argument("--source-gbps", type=float, default=50.0)
    ap.add_argument("--rail-gbps", type=float, default=50.0, help="per GPU, between nodes")
    ap.add_argument("--link-gbps", type=float, default=None, help="per node, between nodes (default: G x rail)")
    ap.add_argument("--load-gbps", type=float, default=400.0)
    ap.add_argument("--measure", action="store_true", help="this machine's bandwidths, and the push measured")
    args = ap.parse_args(argv)
    if min(args.nodes) < 1 or args.gpus_per_node < 1 or not args.bucket_gib > 0:
        ap.error(f"need --nodes >= 1 (got {args.nodes}), --gpus-per-node >= 1 and --bucket-gib > 0")

    cfg = load_model_config(args.model)
    try:
        shapes = tensor_shapes(cfg)
        sizes = tensor_bytes(shapes, args.dtype)
        if args.measure:
            bandwidths = measured_bandwidths()
        else:
            link = args.link_gbps or args.gpus_per_node * args.rail_gbps
            bandwidths = Bandwidths(source=args.source_gbps, link=link, load=args.load_gbps)
    except ValueError as e:
        ap.error(str(e))
    common = {
        "model": args.model,
        "parameters": parameter_count(shapes),
        "dtype": args.dtype,
        "gpus_per_node": args.gpus_per_node,
        "gbps": {k: round(v, 3) for k, v in vars(bandwidths).items()},
        "bandwidths_from": "this machine (64 MiB)" if args.measure else "parameters",
    }
    for nodes in args.nodes:
        for strategy in args.strategy:
            plan = plan_push(
                sizes, nodes=nodes, strategy=strategy, bucket_bytes=int(args.bucket_gib * GIB), bandwidths=bandwidths
            )
            _emit(**common, **plan.summary())
    if args.measure:
        predicted = plan_push(sizes, nodes=2, strategy="head", bucket_bytes=GIB, bandwidths=bandwidths)
        stages = predicted.stage_seconds
        measured = measure_push(sizes)
        _emit(
            **common,
            case="measured",
            strategy="head",
            nodes=2,
            stages="source + transfer (the export and one node's pull; the load into vLLM is not measured here)",
            predicted_s=round(stages["source"] + stages["transfer"], 3),
            measured_s=round(measured["source_s"] + measured["transfer_s"], 3),
            **measured,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
