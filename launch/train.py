"""`timeshare train`: an RL job, from Hydra overrides to a trained run directory.

On the head (the first of cluster.nodes, the only node by default) it makes the run directory, starts
(and always stops) an etcd unless `cluster.etcd` names one, the node's checkpoint engine and trainer
ranks (`launch/node.py`), the other nodes where it starts them itself (cluster=local2), and runs the
iteration controller in this process. On any other node it runs that node's part (`node.run_worker`).
The trainer's first act is the supervised cold start; iteration 0 then exports it, evaluates it and
rolls out; every later iteration trains on the last rollout. `resume=<run dir>` restarts a run from
its newest complete checkpoint with its saved config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

from checkpoint_engine.contracts.engine_client import EngineClient, JobFailedError
from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.vllm_client import SpreadVllmClient, VllmClient
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.etcd_keys import Keys
from checkpoint_engine.etcd_watch import brief
from checkpoint_engine.process_group import ProcessGroup
from engine.config import RolloutConfig
from engine.controller import Controller, Tokens
from engine.metrics import MetricsLogger, format_line, summarize_phase_times
from engine.replay_buffer import PartialRolloutBuffer
from engine.rewards import RewardScorer
from engine.tasks import Sample, Task
from launch.config_loading import load_config
from launch.etcd_server import EtcdWatchdog, LocalEtcd, free_loopback_ports
from launch.local_nodes import LocalNetwork, Placement
from launch.node import ENGINE_STOP_GRACE, check_exited, run_worker, start_node
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
    """The head's part: etcd, its own engine and trainer ranks, the other nodes where it starts them
    (cluster=local2), the iterations from `start`, everything stopped; the run's metrics history. A process
    that exits early raises `JobFailedError` naming it; `restarts` (the job's restarts so far) goes into
    every iteration's metrics as `job/restarts`."""
    with ExitStack() as stack:
        others: dict[str, Placement] = {}  # the nodes this head starts itself
        if cfg.cluster.local_nodes:
            _share_cores(len(cfg.cluster.nodes) * cfg.parallel.trainer_ranks)
            net = stack.enter_context(LocalNetwork())
            place = {"address": net.head.address, "head_address": net.head.address, "interface": net.head.interface}
            cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update=place)})
            others = {cfg.cluster.nodes[1]: net.node}
        here = cfg.cluster
        local, watchdog = None, None
        if here.etcd is None:  # a fresh one: a resumed job's phase starts from its checkpoint
            shutil.rmtree(paths.root / "etcd-data", ignore_errors=True)
            local = LocalEtcd(paths.root / "etcd-data", host=here.head_address, port=here.etcd_port)
            etcd = stack.enter_context(local).endpoint
            # A dead etcd starts again on its data at once, even while the controller waits on an engine that
            # waits on etcd (phase.etcd_outage).
            watchdog = stack.enter_context(EtcdWatchdog(local))
        else:
            etcd = here.etcd
            if len(here.nodes) == 1 or here.local_nodes:  # no process of the job is running: none is this attempt's
                _forget_job(etcd, paths.root.name)
        trainer_port = here.trainer_port or free_loopback_ports(1)[0]
        node = start_node(
            stack, cfg, paths, model_dir, etcd=etcd, rollout=rollout, start=start, trainer_port=trainer_port
        )
        spawned = {}
        for name, placement in others.items():
            spawned[name] = _start_local_node(
                stack,
                cfg,
                paths,
                name,
                placement=placement,
                overrides=overrides,
                etcd=etcd,
                trainer_port=trainer_port,
                start=start,
            )

        def check_alive() -> None:
            if watchdog is not None and watchdog.failure is not None:
                raise JobFailedError(watchdog.failure)
            node.check_alive()
            for name, proc in spawned.items():
                check_exited(f"launcher of {name}", proc, paths.logs / f"launcher-{name}.log")

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
            restarted = {"job/restarts": restarts} | ({"etcd/restarts": local.restarts} if local else {})
            metrics.log(iteration, {**values, **restarted})
            bar.write(format_line(iteration, values))
            bar.update(1)
            metrics.plot()

        controller = Controller(
            cfg.run,
            rollout,
            paths,
            phase_timeout=cfg.phase.timeout,
            node=here.node,
            shim=node.client,
            task=task,
            tokens=tokens,
            vllms=lambda: _every_vllm(node.client),
            sampler=cfg.sampler.make(pool, cfg.run.seed),
            buffer=PartialRolloutBuffer(rollout.buffer()),
            scorer=RewardScorer(cfg.reward, task),
            pool=pool,
            heldout=heldout,
            log_metrics=record,
            check_alive=check_alive,
        )
        if start:
            controller.load_state(start)
        with _failures_named(check_alive):
            controller.run(start)
        node.trainer.wait(timeout=120)
        for proc in spawned.values():
            proc.wait(timeout=120)
    return metrics.history()


def _share_cores(ranks: int) -> None:
    """Nodes simulated on this machine (cluster=local2) share its cores: every process started from here gets
    its share of OpenMP threads, as a node of its own would (torchrun sets 1 only for several ranks of one
    node). Two one-rank nodes each spinning 2 threads on 2 cores made the cold start 7x slower. A value the
    user set is kept."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))


def _forget_job(endpoint: str, job: str) -> None:
    """Remove what an earlier attempt of `job` (a restart, a resume) left in an etcd of the cluster's: its
    phase, FAILED or mid-iteration, would be taken up again by this attempt's leader."""
    try:
        with connect(endpoint) as client:
            removed = client.delete_prefix(Keys(job).root).deleted
    except Exception as e:  # pyetcd's and gRPC's errors
        raise JobFailedError(f"etcd at {endpoint} (cluster.etcd) did not answer: {brief(e)}") from e
    if removed:
        log.info("removed %d keys an earlier attempt of job %s left in etcd at %s", removed, job, endpoint)


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


def _start_local_node(
    stack: ExitStack,
    cfg: TrainConfig,
    paths: RunPaths,
    name: str,
    *,
    placement: Placement,
    overrides: list[str],
    etcd: str,
    trainer_port: int,
    start: int,
) -> ProcessGroup:
    """`timeshare train` for node `name` of this machine, in its network namespace, with the head's overrides
    (from a checkpoint, `resume=` the run) and what it needs to join: the job, the addresses, etcd and the
    trainer rendezvous."""
    nodes = ",".join(cfg.cluster.nodes)
    join = [
        f"cluster.node={name}",
        f"cluster.nodes=[{nodes}]",
        f"cluster.job={paths.root.name}",
        f"cluster.address={placement.address}",
        f"cluster.head_address={cfg.cluster.head_address}",
        f"cluster.etcd={etcd}",
        f"cluster.trainer_port={trainer_port}",
        f"cluster.interface={placement.interface}",
        "cluster.local_nodes=false",
        "cluster.engine_port=0",
        "cluster.vllm_port=0",
    ]
    # Resumed, it checks its given config (transfer included, for several nodes) before taking the saved one.
    job = (
        [f"resume={paths.root}", f"transfer.kind={cfg.transfer.kind}"]
        if start
        else [*overrides, f"run.root={paths.root.parent}"]
    )
    argv = [*placement.prefix, sys.executable, "-m", "launch.cli", "train", *job, *join]
    proc = ProcessGroup.spawn(argv, paths.logs / f"launcher-{name}.log", parent_death=signal.SIGTERM)
    stack.callback(proc.stop, ENGINE_STOP_GRACE + 30)  # its engine's stop and its trainer's
    return proc


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
        model_dir, tokens = prepare_model(cfg, paths, rollout)
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
