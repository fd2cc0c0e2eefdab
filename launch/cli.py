"""The `timeshare` command: one subcommand per entry point (make-tiny-model, train, ...)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from checkpoint_engine.contracts.config import ConfigError
from engine.tiny_model import ARCHS, ROPE_SCALINGS, SIZES, TOKENIZERS, TinyModelSpec


def _make_tiny_model(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(**{f.name: getattr(args, f.name) for f in fields(TinyModelSpec)})
    from engine.tiny_model import write_tiny_model

    out = write_tiny_model(args.dir, spec)
    print(f"wrote {spec.arch} model ({spec.layers} layers, hidden {spec.hidden}, vocab {spec.vocab_size}) to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from launch.train import train

    return train(args.overrides)


BENCHMARKS = {  # `timeshare bench WHICH`: the module whose main() runs it
    "push": "launch.bench",
    "cycle": "launch.bench_cycle",
    "partial": "launch.bench_partial",
    "scale": "launch.bench_scale",
    "sandbox": "launch.bench_sandbox",
    "nodes": "launch.bench_nodes",
    "plan": "launch.bench_plan",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(BENCHMARKS[args.which]).main(args.options)


def _export(args: argparse.Namespace) -> int:
    from sidecars.megatron.hf_export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.out_dir, args.iteration)  # a bad run or iteration: one line
    print(f"wrote an HF model to {out}")
    return 0


def _filter(args: argparse.Namespace) -> int:
    from launch import filter as prompt_filter

    return prompt_filter.main(args.options)


def _long2short(args: argparse.Namespace) -> int:
    from launch import long2short

    return long2short.main(args.options)


def _status(args: argparse.Namespace) -> int:
    from launch import status

    return status.main(args.run_dir, args.etcd, args.job, args.watch)


def _engine(args: argparse.Namespace) -> int:
    import logging

    from checkpoint_engine.api import serve
    from checkpoint_engine.config import EngineConfig

    cfg = EngineConfig.from_json_file(args.config)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{cfg.node}] %(name)s: %(message)s")
    serve(cfg)
    return 0


def _vllm_zygote(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecars.vllm import zygote

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    zygote.main(["--zygote", str(Path(args.dir) / "vllm"), "--external"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timeshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model", help="write an HF-format Llama/Qwen2/Qwen3/Qwen3-MoE model with a character or BPE tokenizer"
    )
    tiny.add_argument("dir", help="output directory")
    defaults = TinyModelSpec()
    tiny.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    tiny.add_argument("--tokenizer", choices=TOKENIZERS, default=defaults.tokenizer)
    tiny.add_argument("--rope-scaling", dest="rope_scaling", choices=ROPE_SCALINGS, default=defaults.rope_scaling)
    for name in (*SIZES, "seed"):
        tiny.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(defaults, name))
    tiny.add_argument("--rope-theta", dest="rope_theta", type=float, default=defaults.rope_theta)
    tiny.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true")
    tiny.set_defaults(func=_make_tiny_model)

    bench = sub.add_parser("bench", help="benchmarks, one JSON line per result")
    bench.add_argument(
        "which",
        choices=list(BENCHMARKS),
        help="push: weight-push throughput against same-run baselines; cycle: an iteration's phases per lifecycle; "
        "partial: iteration time with and without partial rollouts; scale: the switch at 0.5B and 1.5B shapes; "
        "sandbox: the code task's cost per program and throughput per reward worker; nodes: the etcd phase machine "
        "of many simulated nodes; plan: the weight push planned for a model and a layout",
    )
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (--help for them)")
    bench.set_defaults(func=_bench)

    eng = sub.add_parser("engine", help="run this node's checkpoint engine (phase machine, vLLM, weight buffers)")
    eng.add_argument("config", help="the engine's JSON config (checkpoint_engine.config.EngineConfig)")
    eng.set_defaults(func=_engine)

    zygote = sub.add_parser(
        "vllm-zygote",
        help="a vLLM container's command: import vLLM once, then start a vLLM for each rollout the "
        "node's checkpoint engine asks for (cluster.vllm_zygote=DIR), until stopped",
    )
    zygote.add_argument("dir", help="a directory the trainer's container sees at the same path")
    zygote.set_defaults(func=_vllm_zygote)

    train = sub.add_parser("train", help="run the RL job (Hydra overrides, e.g. run.iterations=4 resume=<run dir>)")
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=_train)

    status = sub.add_parser("status", help="a job's phase, leader, nodes, vLLMs and phase times, from etcd")
    status.add_argument("run_dir", nargs="?", default=None, help="a run directory (names its etcd and job)")
    status.add_argument("--etcd", default=None, help="HOST:PORT of the job's etcd; alone, lists its jobs")
    status.add_argument("--job", default=None, help="the job's name (a run directory's name for `timeshare train`)")
    status.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="redraw every SECONDS")
    status.set_defaults(func=_status)

    filt = sub.add_parser(
        "filter", help="a file task's records whose pass rate under a model lies in a band, as JSONL with difficulty"
    )
    filt.add_argument("options", nargs=argparse.REMAINDER, help="MODEL_DIR OUT.jsonl [--k --low --high] [overrides]")
    filt.set_defaults(func=_filter)

    l2s = sub.add_parser("long2short", help="shorter answers: two models' weights merged, or the shortest passing")
    l2s.add_argument("options", nargs=argparse.REMAINDER, help="merge A B OUT --weight W | shortest RUN OUT [--k N]")
    l2s.set_defaults(func=_long2short)

    export = sub.add_parser("export", help="write a checkpoint of a run as an HF model directory")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("out_dir", help="where to write config, tokenizer and model.safetensors")
    export.add_argument("--iteration", type=int, default=None, help="the checkpoint (default: the newest complete)")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:  # the user's input cannot run as given: one clear line, no traceback (a bug keeps its)
        print(f"timeshare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
