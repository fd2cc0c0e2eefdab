"""The head's preparation of a run, before any process starts: the run directory (new, named or resumed), the
model (given, or the tiny one made from the spec) with its tokenizer and the KV cache it needs, and the cold
start's examples. Every check that can fail on the user's input fails here, before anything is started.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from pathlib import Path

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.run_dir import RunManifest, RunPaths
from engine.config import RolloutConfig
from engine.tasks import Sample
from engine.tasks.jsonl import json_objects
from engine.tokenizer import Tokens, load_tokens
from launch.config_loading import resumed_config
from launch.node import resume_point
from launch.train_config import ParallelConfig, TrainConfig
from sidecars.megatron.arch import ModelArch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # model.dtype -> bytes per element


def prepare_run(cfg: TrainConfig, overrides: list[str]) -> tuple[TrainConfig, RunPaths, int]:
    """The config, run directory and first iteration: new run, or the newest checkpoint of `resume`."""
    if cfg.resume is None:
        _check_machine(cfg)
        if cfg.model.path is not None:
            check_model_dir(Path(cfg.model.path), cfg.parallel)
        root = Path(cfg.run.root)
        made = new_run_dir(root, cfg.run.name) if cfg.cluster.job is None else _named_run_dir(root, cfg.cluster.job)
        check_batches_from(cfg, 0)
        paths = RunPaths(made).make()
        paths.config.write_text(json.dumps(cfg.to_dict(), indent=2))
        return cfg, paths, 0
    paths = RunPaths(Path(cfg.resume))
    start = resume_point(paths)
    saved = resumed_config(cfg, overrides, paths.config, paths.root.name)
    _check_machine(saved)
    check_batches_from(saved, start)
    return saved, paths.make(), start


def check_batches_from(cfg: TrainConfig, start: int) -> None:
    """run.mode=train_only: `run.batches_from` is a run of the same model holding a batch for every version the
    iterations from `start` roll out (all but the last)."""
    if cfg.run.batches_from is None:
        return
    source = RunPaths(Path(cfg.run.batches_from))
    where = f"run.batches_from={source.root}"
    if not source.config.is_file():
        raise ConfigError(f"{where}: not a run directory (no {source.config.name})")
    theirs = json.loads(source.config.read_text()).get("model")
    if theirs != cfg.model.to_dict():
        raise ConfigError(f"{where}: its model {theirs} is not this run's {cfg.model.to_dict()}")
    missing = [v for v in range(start, cfg.run.iterations) if not source.batch(v).is_file()]
    if missing:
        held = sorted(int(p.stem.removeprefix("iter_")) for p in source.batch(0).parent.glob("iter_*.pt"))
        raise ConfigError(
            f"{where}: no batch of versions {missing} (it holds {held}); lower run.iterations to {len(held)} or less"
        )


def _check_machine(cfg: TrainConfig) -> None:
    import torch

    cfg.check_machine(has_cuda=torch.cuda.is_available(), cpu_bfloat16=torch.ops.mkldnn._is_mkldnn_bf16_supported())


def new_run_dir(root: Path, name: str) -> Path:
    """`root/<name>-<time>`, made here and by no other run: one started in the same second gets `-2`, `-3`..."""
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()  # atomic: of two runs racing for a name, one gets it
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"run.root={root}: a thousand runs named {base} already; choose another run.name")


def _named_run_dir(root: Path, job: str) -> Path:
    """`root/<cluster.job>`, made here: a job's name is its run directory's on every node."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / job).mkdir()
    except FileExistsError:
        raise ConfigError(f"cluster.job={job}: {root / job} exists; resume= it, or choose another job name") from None
    return root / job


def check_model_dir(model_dir: Path, parallel: ParallelConfig) -> None:
    """model.path is an HF model directory of a supported architecture with a tokenizer, whose shape
    the trainer's parallel layout divides, before anything starts."""
    where = f"model.path={model_dir}"
    if not model_dir.is_dir():
        raise ConfigError(f"{where}: no such directory; give an HF model directory, or null for the tiny model")
    try:
        arch = ModelArch.from_pretrained(model_dir)
        arch.check_tensor_parallel(parallel.trainer_tp)
        arch.check_expert_parallel(parallel.trainer_ep)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{where} is not a model timeshare can train: {e}") from None
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many kinds, in several lines
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError(f"{where}: its tokenizer does not load ({why})") from None


def _model_dir(cfg: TrainConfig, paths: RunPaths) -> Path:
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    if not (paths.model_init / "config.json").exists():
        from engine.tiny_model import write_tiny_model

        write_tiny_model(paths.model_init, cfg.model.tiny_spec(seed=cfg.run.seed))
    return paths.model_init


def prepare_model(
    cfg: TrainConfig, paths: RunPaths, rollout: RolloutConfig, samples: Iterable[Sample]
) -> tuple[Path, Tokens]:
    """The model's directory (the tiny model written on first use), checked against the KV cache, and
    its tokens, checked against the task's `samples`."""
    model_dir = _model_dir(cfg, paths)
    check_kv_cache(rollout, model_dir, cfg.model.dtype, cfg.parallel.vllm_tp)
    RunManifest(
        model_dir=str(model_dir), trainer_tp=cfg.parallel.trainer_tp, trainer_ep=cfg.parallel.trainer_ep
    ).to_json_file(paths.manifest)
    texts = [t for s in samples for t in (s.prompt, s.answer, s.demonstration) if t]
    return model_dir, load_tokens(model_dir, rollout.stop, cfg.task.chat_template, texts)


def check_kv_cache(rollout: RolloutConfig, model_dir: Path, dtype: str, vllm_tp: int) -> None:
    """An explicit KV cache must hold one whole sequence of max_model_len tokens (per vLLM worker)."""
    if rollout.kv_cache_gib is None:
        return
    arch = ModelArch.from_pretrained(model_dir)
    per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * DTYPE_BYTES[dtype]  # K and V of every layer
    needed = per_token * rollout.max_model_len / max(1, vllm_tp) / 2**30
    if rollout.kv_cache_gib < needed:
        raise ConfigError(
            f"rollout.kv_cache_gib={rollout.kv_cache_gib} cannot hold one sequence of max_model_len="
            f"{rollout.max_model_len} tokens of {model_dir} ({needed:.3g} GiB per vLLM worker): raise it, or "
            "set it to null to let vLLM size the cache from rollout.gpu_memory_utilization"
        )


def cold_start_examples(cfg: TrainConfig, pool: list[Sample], tokens: Tokens, stop: str) -> list[list[list[int]]]:
    """At most a tenth of the RL pool, answered (worked steps included where the task demonstrates
    them), or every pair of `trainer.cold_start.data`; each ended by the stop string, or the
    end-of-sequence token without one: a random model earns no reward to learn from."""
    end = [] if stop else [tokens.stop_ids[-1]]
    if cfg.trainer.cold_start.data is not None:
        pairs = read_sft_pairs(Path(cfg.trainer.cold_start.data))
    else:
        n = int(cfg.trainer.cold_start.fraction * len(pool))
        pairs = [(s.prompt, s.demonstration or s.answer) for s in random.Random(cfg.run.seed).sample(pool, n)]
    return [[tokens.encode(prompt), tokens.encode_response(response + stop) + end] for prompt, response in pairs]


def read_sft_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) of each record of a JSONL file, or a ConfigError naming the line."""
    if not path.is_file():
        raise ConfigError(f"trainer.cold_start.data={str(path)!r} is not a file")
    pairs = []
    for lineno, record in json_objects(path):
        fields = [record.get(k) for k in ("prompt", "response")]
        if not all(isinstance(v, str) and v for v in fields):
            raise ConfigError(f"{path}:{lineno}: a cold-start record needs non-empty strings 'prompt' and 'response'")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ConfigError(f"trainer.cold_start.data={str(path)!r} holds no records")
    return pairs
