"""`timeshare train`: an RL job, from Hydra overrides to a trained run directory.

On the head (the first of cluster.nodes, the only node by default) it prepares the run directory
(`launch/run_setup.py`), starts the attempt's processes (`launch/job.py`: etcd unless `cluster.etcd` names
one, the node's checkpoint engine and trainer ranks, the other nodes where it starts them itself), runs the
iteration controller in this process, and starts a failed attempt again from its newest checkpoint
(`run.restarts`). On any other node it runs that node's part (`node.run_worker`).
The trainer's first act is the supervised cold start; iteration 0 then exports it, evaluates it and
rolls out; every later iteration trains on the last rollout. `resume=<run dir>` restarts a run from
its newest complete checkpoint with its saved config.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

from checkpoint_engine.contracts.engine_client import EngineClient, JobFailedError
from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SpreadVllmClient, VllmClient
from engine.config import RolloutConfig
from engine.controller import Controller, Tokens
from engine.metrics import MetricsLogger, format_line, summarize_phase_times
from engine.replay_buffer import PartialRolloutBuffer
from engine.rewards import RewardScorer
from engine.tasks import Sample, Task
from launch.config_loading import load_config
from launch.job import started_job
from launch.node import run_worker
from launch.run_setup import cold_start_examples, prepare_model, prepare_run
from launch.train_config import TrainConfig
from sidecars.megatron.hf_export import export_checkpoint

log = logging.getLogger("timeshare.train")


def _every_vllm(engine: EngineClient) -> SpreadVllmClient:
    """The vLLMs of every live node of the job, as its engines registered them in etcd."""
    return SpreadVllmClient({node: VllmClient(where.vllm) for node, where in engine.nodes().items()})


def _how_to_continue(paths: RunPaths) -> str:
    if paths.complete_checkpoints():
        return f"continue with `timeshare train resume={paths.root}`"
    return "no checkpoint was written, so start the run again"


def _restart_point(cfg: TrainConfig, paths: RunPaths, restarts: int) -> int | None:
    """The iteration a failed job restarts from: its newest sound checkpoint, or 0 (the start) while it has
    written none; None when no restarts are left, when every checkpoint is damaged (starting over would write
    over them), or for a job with nodes this launcher does not start (and so cannot restart)."""
    if restarts >= cfg.run.restarts or (len(cfg.cluster.nodes) > 1 and not cfg.cluster.local_nodes):
        return None
    return paths.latest_checkpoint() if paths.complete_checkpoints() else 0


def _restarting_from(start: int) -> str:
    return f"the checkpoint of iteration {start}" if start else "the start, as no checkpoint was written yet"


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds the ExitStack: engine, trainer and etcd stop


def _run_job(
    cfg: TrainConfig,
    paths: RunPaths,
    start: int,
    overrides: list[str],
    *,
    rollout: RolloutConfig,
    model_dir: Path,
    tokens: Tokens,
    task: Task,
    pool: list[Sample],
    heldout: list[Sample],
    restarts: int,
) -> list[dict[str, float]]:
    """The head's part: the attempt's processes (`launch/job.py`), the iterations from `start`, everything
    stopped; the run's metrics history. A process that exits early raises `JobFailedError` naming it;
    `restarts` (the job's restarts so far) goes into every iteration's metrics as `job/restarts`."""
    with ExitStack() as stack:
        job = stack.enter_context(
            started_job(cfg, paths, start=start, overrides=overrides, rollout=rollout, model_dir=model_dir)
        )
        metrics = MetricsLogger(paths.root, echo=None)
        stack.callback(metrics.close)
        from tqdm import tqdm

        bar = stack.enter_context(
            tqdm(
                total=cfg.run.iterations + 1,
                initial=start,
                desc="iterations",
                disable=not cfg.run.progress,
                dynamic_ncols=True,
            )
        )

        def record(iteration: int, values: dict[str, float]) -> None:
            metrics.log(iteration, {**values, "job/restarts": restarts, **job.etcd_metrics()})
            bar.write(format_line(iteration, values))
            bar.update(1)
            metrics.plot()

        controller = Controller(
            cfg.run,
            rollout,
            paths,
            phase_timeout=cfg.phase.timeout,
            node=job.cfg.cluster.node,
            shim=job.node.client,
            task=task,
            tokens=tokens,
            vllms=lambda: _every_vllm(job.node.client),
            sampler=cfg.sampler.make(pool, cfg.run.seed),
            buffer=PartialRolloutBuffer(rollout.buffer()),
            scorer=RewardScorer(cfg.reward, task),
            pool=pool,
            heldout=heldout,
            log_metrics=record,
            check_alive=job.check_alive,
        )
        if start:
            controller.load_state(start)
        with _failures_named(job.check_alive):
            controller.run(start)
        job.wait_ended()
    return metrics.history()


@contextmanager
def _failures_named(check_alive: Callable[[], None], wait: float = 5.0) -> Iterator[None]:
    """A request of the controller's that fails (a broken connection, a read timed out: the engine most likely
    died or stalled under it) becomes the job's one-line failure, which a restart handles."""
    try:
        yield
    except requests.RequestException as e:
        raise _named_failure(check_alive, e, wait) from e


def _named_failure(check_alive: Callable[[], None], error: Exception, wait: float) -> JobFailedError:
    """The failure of the process whose death broke a request, once it is seen to have exited (within `wait` s);
    else one naming the failed request."""

    def exited() -> JobFailedError | None:
        try:
            check_alive()
        except JobFailedError as failed:
            return failed
        return None

    failed = f"a request of the controller's to the job failed ({type(error).__name__}: {error})"
    return poll_until(exited, wait, every=0.1) or JobFailedError(failed)


def train(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # A shell starts a background job with SIGINT ignored, and Python keeps it so: `kill -INT` would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = load_config(overrides)
    if not cfg.cluster.is_head:
        return run_worker(cfg, overrides)
    cfg, paths, start = prepare_run(cfg, overrides)
    rollout = cfg.effective_rollout()  # the lengths that run, long-context preset applied
    try:
        task = cfg.task.make()  # a bad dataset record fails here, before the model is written
        pool = task.samples("train", cfg.task.pool_size, cfg.run.seed)
        heldout = task.samples("heldout", cfg.task.heldout_size, cfg.run.seed)
        model_dir, tokens = prepare_model(cfg, paths, rollout, [*pool, *heldout])
        if start == 0:
            paths.cold_start.write_text(json.dumps(cold_start_examples(cfg, pool, tokens, rollout.stop)))
    except BaseException:
        if start == 0:  # a new run that fails before anything started leaves no half-made directory
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    print(f"timeshare train: run directory {paths.root} (starting at iteration {start})", flush=True)

    restarts = 0
    while True:
        try:
            history = _run_job(
                cfg,
                paths,
                start,
                overrides,
                rollout=rollout,
                model_dir=model_dir,
                tokens=tokens,
                task=task,
                pool=pool,
                heldout=heldout,
                restarts=restarts,
            )
            break
        except KeyboardInterrupt:
            print(f"timeshare train: interrupted; {_how_to_continue(paths)}", flush=True)
            return 130
        except JobFailedError as e:  # a process could not do its part: the cause in one line, the rest in the logs
            again = _restart_point(cfg, paths, restarts)
            if again is None:
                print(f"timeshare train: {e}; logs in {paths.logs}; {_how_to_continue(paths)}", flush=True)
                return 1
            restarts, start = restarts + 1, again
            print(
                f"timeshare train: {e}; restarting from {_restarting_from(start)} (restart {restarts} "
                f"of run.restarts={cfg.run.restarts}); logs in {paths.logs}",
                flush=True,
            )
    print(summarize_phase_times(history), flush=True)
    final = export_checkpoint(paths.root, paths.root / "hf")  # the trained model, loadable by transformers and vLLM
    print(
        f"timeshare train: done; metrics, TensorBoard logs and progress.png in {paths.root}, the model in {final}",
        flush=True,
    )
    return 0
