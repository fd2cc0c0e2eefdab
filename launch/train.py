"""`timeshare train`: one node's whole RL job, from Hydra overrides to a trained run directory.

Starts (and always stops) a local etcd unless `cluster.etcd` names one, the node's checkpoint
engine (`timeshare engine`), the trainer ranks (torchrun, `sidecars.megatron.rank_main`) and runs
the iteration controller in this process. The trainer's first act is the supervised cold start;
iteration 0 then exports it, evaluates it and rolls out; every later iteration trains on the last
rollout. `resume=<run dir>` restarts a run from its newest complete checkpoint with its saved config.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.engine_client import EngineClient, JobFailedError
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SpreadVllmClient, VllmClient
from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from checkpoint_engine.process_group import ProcessGroup, last_error
from engine.config import RolloutConfig
from engine.controller import Controller, Tokens
from engine.metrics import MetricsLogger, format_line, summarize_phase_times
from engine.replay_buffer import PartialRolloutBuffer
from engine.rewards import RewardScorer
from engine.tasks import Sample, Task
from launch.config_loading import load_config
from launch.etcd_server import LocalEtcd, free_loopback_ports
from launch.train_config import TrainConfig
from sidecars.megatron.arch import ModelArch
from sidecars.megatron.config import RankConfig
from sidecars.megatron.hf_export import export_checkpoint

log = logging.getLogger("timeshare.train")
# The engine's own shutdown (vLLM killed, weight regions removed, lease revoked) before it is killed.
ENGINE_STOP_GRACE = 30.0

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # model.dtype -> bytes per element


def _prepare_run(overrides: list[str]) -> tuple[TrainConfig, RunPaths, int]:
    """The config, run directory and first iteration: new run, or the newest checkpoint of `resume`."""
    cfg = load_config(overrides)
    if cfg.resume is None:
        _check_machine(cfg)
        if cfg.model.path is not None:
            _check_model_dir(Path(cfg.model.path))
        paths = RunPaths(_new_run_dir(Path(cfg.run.root), cfg.run.name)).make()
        paths.config.write_text(json.dumps(cfg.to_dict(), indent=2))
        return cfg, paths, 0
    others = [o for o in overrides if not o.startswith("resume=")]
    if others:
        raise ConfigError(f"resume runs with the run's saved config; drop the other overrides {others}")
    paths = RunPaths(Path(cfg.resume))
    if not paths.config.exists():
        raise ConfigError(f"resume={cfg.resume}: not a run directory (no {paths.config.name})")
    start = paths.latest_checkpoint()  # warns about newer damaged ones
    if start is None:
        damaged = " sound" if paths.complete_checkpoints() else " complete"
        raise ConfigError(f"resume={cfg.resume}: the run has no{damaged} checkpoint; start it again instead")
    saved = TrainConfig.from_dict(json.loads(paths.config.read_text()))
    _check_machine(saved)
    return saved, paths.make(), start


def _check_machine(cfg: TrainConfig) -> None:
    import torch

    cfg.check_machine(has_cuda=torch.cuda.is_available())


def _new_run_dir(root: Path, name: str) -> Path:
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


def _check_model_dir(model_dir: Path) -> None:
    """model.path is an HF model directory of a supported architecture with a tokenizer, before anything starts."""
    where = f"model.path={model_dir}"
    if not model_dir.is_dir():
        raise ConfigError(f"{where}: no such directory; give an HF model directory, or null for the tiny model")
    try:
        ModelArch.from_pretrained(model_dir)
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


def _prepare_model(cfg: TrainConfig, paths: RunPaths, rollout: RolloutConfig) -> tuple[Path, Tokens]:
    """The model's directory (the tiny model written on first use), checked against the KV cache, and
    its tokens."""
    model_dir = _model_dir(cfg, paths)
    _check_kv_cache(rollout, model_dir, cfg.model.dtype, cfg.parallel.vllm_tp)
    return model_dir, _tokens(model_dir, rollout.stop)


def _check_kv_cache(rollout: RolloutConfig, model_dir: Path, dtype: str, vllm_tp: int) -> None:
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


def _tokens(model_dir: Path, stop: str) -> Tokens:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stop_ids = [tok.eos_token_id]
    if stop:
        ids = tok(stop, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"rollout.stop={stop!r} is {len(ids)} tokens for this tokenizer; it must be one")
        stop_ids.insert(0, ids[0])
    return Tokens(
        encode=lambda text: tok(text)["input_ids"],
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
        stop_ids=tuple(stop_ids),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )


def _cold_start_examples(cfg: TrainConfig, pool: list[Sample], tokens: Tokens, stop: str) -> list[list[list[int]]]:
    """At most a tenth of the RL pool, answered (worked steps included where the task demonstrates
    them): a random model earns no reward to learn from."""
    n = int(cfg.trainer.cold_start.fraction * len(pool))
    chosen = random.Random(cfg.run.seed).sample(pool, n)
    # [1:]: the response without the tokenizer's BOS
    return [[tokens.encode(s.prompt), tokens.encode((s.demonstration or s.answer) + stop)[1:]] for s in chosen]


def _check_exited(name: str, proc: ProcessGroup, log_path: Path) -> None:
    """Raise `JobFailedError` when `proc` has exited: its status and the last error its log names."""
    if proc.poll() is not None:
        raise JobFailedError(f"the {name} exited with status {proc.returncode} ({last_error(log_path)})")


def _every_vllm(engine: EngineClient) -> SpreadVllmClient:
    """The vLLMs of every live node of the job, as its engines registered them in etcd."""
    return SpreadVllmClient({node: VllmClient(where["vllm"]) for node, where in engine.nodes().items()})


def _how_to_continue(paths: RunPaths) -> str:
    if paths.complete_checkpoints():
        return f"continue with `timeshare train resume={paths.root}`"
    return "no checkpoint was written, so start the run again"


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds the ExitStack: engine, trainer and etcd stop


def _engine_config(
    cfg: TrainConfig,
    paths: RunPaths,
    model_dir: Path,
    endpoint: str,
    ports: dict[str, int],
    *,
    rollout: RolloutConfig,
    start: int,
) -> EngineConfig:
    """This node's engine, from the run's sections (the engine reads them as one JSON file);
    `rollout` is the effective one (long-context preset applied)."""
    return EngineConfig(
        node=cfg.cluster.node, job=paths.root.name, etcd=endpoint, nodes=cfg.cluster.nodes, start_iteration=start,
        log_dir=str(paths.logs), port=ports["engine"], lifecycle=rollout.lifecycle, phase=cfg.phase,
        transfer=cfg.transfer,
        vllm=VllmSettings(
            model_dir=str(model_dir), port=ports["vllm"], tensor_parallel=cfg.parallel.vllm_tp,
            gpu_memory_utilization=rollout.gpu_memory_utilization, kv_cache_bytes=rollout.kv_cache_bytes(),
            max_model_len=rollout.max_model_len, dtype=cfg.model.dtype, seed=cfg.run.seed,
        ),
    )  # fmt: skip


def _rank_config(cfg: TrainConfig, paths: RunPaths, model_dir: Path, engine_url: str, *, start: int) -> RankConfig:
    """What every trainer rank runs from (`trainer.json`)."""
    return RankConfig(
        run_dir=str(paths.root), model_dir=str(model_dir), engine_url=engine_url, job=paths.root.name,
        node=cfg.cluster.node, iterations=cfg.run.iterations, start_iteration=start,
        checkpoint_every=cfg.run.checkpoint_every, tensor_parallel=cfg.parallel.trainer_tp,
        phase_timeout=cfg.phase.timeout, seed=cfg.run.seed, temperature=cfg.rollout.temperature,
        dtype=cfg.model.dtype, trainer=cfg.trainer, algo=cfg.algo,
    )  # fmt: skip


def _ports(cfg: TrainConfig) -> dict[str, int]:
    """cluster.engine_port and cluster.vllm_port where set; free loopback ports for the rest."""
    free = iter(free_loopback_ports(3))
    return {
        "engine": cfg.cluster.engine_port or next(free),
        "vllm": cfg.cluster.vllm_port or next(free),
        "torchrun": next(free),
    }


def _run_job(
    cfg: TrainConfig,
    paths: RunPaths,
    start: int,
    *,
    rollout: RolloutConfig,
    model_dir: Path,
    tokens: Tokens,
    task: Task,
    pool: list[Sample],
    heldout: list[Sample],
) -> list[dict[str, float]]:
    """etcd, the engine and the trainer ranks started, the iterations from `start` run, everything stopped;
    the run's metrics history. A process that exits early raises `JobFailedError` naming it."""
    ports = _ports(cfg)
    with ExitStack() as stack:
        if cfg.cluster.etcd is None:  # a fresh one: a resumed job's phase starts from its checkpoint
            shutil.rmtree(paths.root / "etcd-data", ignore_errors=True)
            endpoint = stack.enter_context(LocalEtcd(paths.root / "etcd-data")).endpoint
        else:
            endpoint = cfg.cluster.etcd
        engine_file = _engine_config(cfg, paths, model_dir, endpoint, ports, rollout=rollout, start=start).to_json_file(
            paths.root / f"engine-{cfg.cluster.node}.json"
        )
        # Every child dies with the launcher, even a launcher killed by SIGKILL: SIGTERM lets the engine
        # stop vLLM and remove its regions, and torchrun stop the ranks.
        engine = ProcessGroup.spawn(
            [sys.executable, "-m", "launch.cli", "engine", str(engine_file)],
            paths.logs / "engine.log",
            parent_death=signal.SIGTERM,
        )
        stack.callback(engine.stop, ENGINE_STOP_GRACE)
        client = EngineClient(f"http://127.0.0.1:{ports['engine']}")
        stack.callback(client.close)
        client.wait_for_engine(
            timeout=120, before_poll=lambda: _check_exited("checkpoint engine", engine, paths.logs / "engine.log")
        )

        rank_file = _rank_config(cfg, paths, model_dir, client.base_url, start=start).to_json_file(
            paths.root / "trainer.json"
        )
        trainer = ProcessGroup.spawn([
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.parallel.trainer_ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(ports["torchrun"]),
            "-m", "sidecars.megatron.rank_main", str(rank_file),
        ], paths.logs / "trainer.log", parent_death=signal.SIGTERM)  # fmt: skip
        stack.callback(trainer.stop, 30)

        def check_alive() -> None:
            _check_exited("trainer", trainer, paths.logs / "trainer.log")
            _check_exited("checkpoint engine", engine, paths.logs / "engine.log")

        metrics = MetricsLogger(paths.root, echo=None)
        stack.callback(metrics.close)
        from tqdm import tqdm

        bar = stack.enter_context(tqdm(total=cfg.run.iterations + 1, initial=start, desc="iterations",
                                       disable=not cfg.run.progress, dynamic_ncols=True))  # fmt: skip

        def record(iteration: int, values: dict[str, float]) -> None:
            metrics.log(iteration, values)
            bar.write(format_line(iteration, values))
            bar.update(1)
            metrics.plot()

        controller = Controller(
            cfg.run, rollout, paths, phase_timeout=cfg.phase.timeout, node=cfg.cluster.node, engine=client,
            task=task, tokens=tokens, rollout_engine=lambda: _every_vllm(client),
            sampler=cfg.sampler.make(pool, cfg.run.seed), buffer=PartialRolloutBuffer(rollout.buffer()),
            scorer=RewardScorer(cfg.reward, task), pool=pool, heldout=heldout, log_metrics=record,
            check_alive=check_alive,
        )  # fmt: skip
        if start:
            controller.load_state(start)
        controller.run(start)
        trainer.wait(timeout=120)
    return metrics.history()


def train(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # A shell starts a background job with SIGINT ignored, and Python keeps it so: `kill -INT` would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg, paths, start = _prepare_run(overrides)
    rollout = cfg.effective_rollout()  # the lengths that run, long-context preset applied
    try:
        model_dir, tokens = _prepare_model(cfg, paths, rollout)
        task = cfg.task.make()
        pool = task.samples("train", cfg.task.pool_size, cfg.run.seed)
        heldout = task.samples("heldout", cfg.task.heldout_size, cfg.run.seed)
        if start == 0:
            paths.cold_start.write_text(json.dumps(_cold_start_examples(cfg, pool, tokens, rollout.stop)))
    except BaseException:
        if start == 0:  # a new run that fails before anything started leaves no half-made directory
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    print(f"timeshare train: run directory {paths.root} (starting at iteration {start})", flush=True)

    try:
        history = _run_job(cfg, paths, start, rollout=rollout, model_dir=model_dir, tokens=tokens, task=task,
                           pool=pool, heldout=heldout)  # fmt: skip
    except KeyboardInterrupt:
        print(f"timeshare train: interrupted; {_how_to_continue(paths)}", flush=True)
        return 130
    except JobFailedError as e:  # a process could not do its part: the cause in one line, the rest in the logs
        print(f"timeshare train: {e}; logs in {paths.logs}; {_how_to_continue(paths)}", flush=True)
        return 1
    print(summarize_phase_times(history), flush=True)
    final = export_checkpoint(paths.root, paths.root / "hf")  # the trained model, loadable by transformers and vLLM
    print(f"timeshare train: done; metrics, TensorBoard logs and progress.png in {paths.root}, the model in {final}",
          flush=True)  # fmt: skip
    return 0
