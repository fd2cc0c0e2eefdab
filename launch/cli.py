"""The `timeshare` command: one subcommand per entry point (make-tiny-model, train, ...)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from engine.tiny_model import ARCHS, TinyModelSpec


def _make_tiny_model(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(**{f.name: getattr(args, f.name) for f in fields(TinyModelSpec)})
    from engine.tiny_model import write_tiny_model

    out = write_tiny_model(args.dir, spec)
    print(f"wrote {spec.arch} model ({spec.layers} layers, hidden {spec.hidden}, vocab {spec.vocab_size}) to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from launch.train import train

    return train(args.overrides)


def _bench(args: argparse.Namespace) -> int:
    from launch import bench

    return bench.main(args.options)


def _engine(args: argparse.Namespace) -> int:
    import logging

    from checkpoint_engine.api import serve
    from checkpoint_engine.daemon import EngineConfig
    from checkpoint_engine.etcd_client import parse_endpoint
    from checkpoint_engine.mooncake_transport import MooncakeConfig
    from checkpoint_engine.vllm_process import VllmLaunch

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{args.node_id}] %(name)s: %(message)s")
    parse_endpoint(args.etcd)
    run_dir = Path(args.run_dir)
    nodes = tuple(args.nodes.split(",")) if args.nodes else (args.node_id,)
    cfg = EngineConfig(
        node=args.node_id,
        job=args.job,
        etcd=args.etcd,
        nodes=nodes,
        vllm=VllmLaunch(
            model_dir=args.model,
            port=args.vllm_port,
            log_path=str(run_dir / f"vllm-{args.node_id}.log"),
            tensor_parallel=args.vllm_tensor_parallel,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_len=args.vllm_max_model_len,
        ),
        mooncake=MooncakeConfig(protocol=args.mooncake, hostname=args.host) if args.mooncake else None,
        weights_from=tuple(args.weights_from.split(",")) if args.weights_from else (),
        phase_timeout=args.phase_timeout,
        ttl=args.ttl,
        terminate_grace=args.terminate_grace,
        start_iteration=args.start_iteration,
    )
    serve(cfg, args.host, args.port, args.token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timeshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write an HF-format Llama/Qwen2 model with a character tokenizer")
    tiny.add_argument("dir", help="output directory")
    defaults = TinyModelSpec()
    tiny.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions", "vocab_multiple", "seed"):
        tiny.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(defaults, name))
    tiny.add_argument("--rope-theta", dest="rope_theta", type=float, default=defaults.rope_theta)
    tiny.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true")
    tiny.set_defaults(func=_make_tiny_model)

    bench = sub.add_parser("bench", help="benchmarks, one JSON line per result")
    bench.add_argument("which", choices=["push"], help="push: weight-push throughput against same-run baselines")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (--help for them)")
    bench.set_defaults(func=_bench)

    eng = sub.add_parser("engine", help="run this node's checkpoint engine (phase machine, vLLM, weight buffers)")
    eng.add_argument("--node-id", required=True)
    eng.add_argument("--etcd", required=True, help="HOST:PORT of the job's etcd")
    eng.add_argument("--job", default="default")
    eng.add_argument("--nodes", default="", help="comma-separated node ids of the job (default: this node only)")
    eng.add_argument("--model", required=True, help="HF model directory (config and tokenizer; weights are pushed)")
    eng.add_argument("--host", default="127.0.0.1")
    eng.add_argument("--port", type=int, required=True, help="port of the engine's HTTP API")
    eng.add_argument("--token", default=None, help="bearer token; required when --host is not loopback")
    eng.add_argument("--vllm-port", type=int, required=True)
    eng.add_argument("--vllm-tensor-parallel", type=int, default=1)
    eng.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.15)
    eng.add_argument("--vllm-max-model-len", type=int, default=512)
    eng.add_argument("--mooncake", choices=["tcp", "rdma"], default=None, help="transport to other nodes")
    eng.add_argument("--weights-from", default="", help="nodes whose exports this node loads (no local trainer)")
    eng.add_argument("--phase-timeout", type=float, default=900.0)
    eng.add_argument("--ttl", type=int, default=10, help="node lease seconds")
    eng.add_argument("--terminate-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    eng.add_argument("--start-iteration", type=int, default=0, help="resume: the job restarts at EXPORT of it")
    eng.add_argument("--run-dir", default="runs/engine")
    eng.set_defaults(func=_engine)

    train = sub.add_parser("train", help="run the RL job (Hydra overrides, e.g. run.iterations=4 resume=<run dir>)")
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration errors: one clear line, no traceback
        print(f"timeshare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
