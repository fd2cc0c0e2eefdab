"""One attempt of a job's processes on the head, started and always stopped together: etcd (the head's own,
watched and started again if it dies, or the cluster's, cleared of what an earlier attempt left), this node's
checkpoint engine and trainer ranks (`launch/node.py`), and the nodes the head starts itself (cluster=local2,
each in a network namespace of its own). `started_job` yields a `Job`; leaving it stops every process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from checkpoint_engine.contracts.engine_client import JobFailedError
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.etcd_keys import Keys, attempts_of
from checkpoint_engine.etcd_watch import brief
from checkpoint_engine.job_status import job_names
from checkpoint_engine.process_group import ProcessGroup
from engine.config import RolloutConfig
from launch.etcd_server import EtcdWatchdog, LocalEtcd, free_loopback_ports
from launch.local_nodes import LocalNetwork, Placement
from launch.node import ENGINE_STOP_GRACE, Node, check_exited, start_node
from launch.train_config import TrainConfig

log = logging.getLogger("timeshare.job")


@dataclass(frozen=True)
class Job:
    cfg: TrainConfig  # with this machine's placement (cluster=local2: the namespaces' addresses)
    paths: RunPaths
    node: Node  # the head's engine and trainer ranks
    others: dict[str, ProcessGroup]  # the launchers of the nodes the head started
    etcd: LocalEtcd | None  # the head's own etcd; None: the cluster's
    watchdog: EtcdWatchdog | None

    def check_alive(self) -> None:
        """A `JobFailedError` naming the first process of the attempt found dead (etcd that could not be started
        again, the engine, a trainer rank, another node's launcher)."""
        if self.watchdog is not None and self.watchdog.failure is not None:
            raise JobFailedError(self.watchdog.failure)
        self.node.check_alive()
        for name, proc in self.others.items():
            check_exited(f"launcher of {name}", proc, self.paths.logs / f"launcher-{name}.log")

    def etcd_metrics(self) -> dict[str, float]:
        return {"etcd/restarts": float(self.etcd.restarts)} if self.etcd is not None else {}

    def wait_ended(self, timeout: float = 120.0) -> None:
        """Every trainer of the job has exited, as each does after its last iteration."""
        self.node.trainer.wait(timeout=timeout)
        for proc in self.others.values():
            proc.wait(timeout=timeout)


@contextmanager
def started_job(
    cfg: TrainConfig, paths: RunPaths, *, start: int, overrides: list[str], rollout: RolloutConfig, model_dir: Path
) -> Iterator[Job]:
    """The attempt's processes from iteration `start` (`rollout`: the effective section), every one answering
    or started; all of them stopped when the block is left, however it is left."""
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
                _forget_earlier_attempts(etcd, paths.root.name, keep=None)
            elif here.attempt is not None:  # the other nodes may have joined this attempt's namespace already
                _forget_earlier_attempts(etcd, paths.root.name, keep=here.namespace(paths.root.name))
        trainer_port = here.trainer_port or free_loopback_ports(1)[0]
        node = start_node(
            stack, cfg, paths, model_dir, etcd=etcd, rollout=rollout, start=start, trainer_port=trainer_port
        )
        spawned = {
            name: _start_local_node(
                stack,
                cfg,
                paths,
                name,
                placement=p,
                overrides=overrides,
                etcd=etcd,
                trainer_port=trainer_port,
                start=start,
            )
            for name, p in others.items()
        }
        yield Job(cfg=cfg, paths=paths, node=node, others=spawned, etcd=local, watchdog=watchdog)


def _share_cores(ranks: int) -> None:
    """Nodes simulated on this machine (cluster=local2) share its cores: every process started from here gets
    its share of OpenMP threads, as a node of its own would (torchrun sets 1 only for several ranks of one
    node). Two one-rank nodes each spinning 2 threads on 2 cores made the cold start 7x slower. A value the
    user set is kept."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))


def _forget_earlier_attempts(endpoint: str, job: str, keep: str | None) -> None:
    """Remove what earlier attempts of `job` (a restart, a resume, a requeue) left in an etcd of the cluster's,
    under the job's name or an attempt's (`etcd_keys.attempt_namespace`), all but the namespace `keep`: an
    earlier attempt's phase, FAILED or mid-iteration, would be taken up again by this attempt's leader."""
    try:
        with connect(endpoint) as client:
            found = job_names(client, starting=job)
            removed = {n: client.delete_prefix(Keys(n).root).deleted for n in attempts_of(job, found) if n != keep}
    except Exception as e:  # pyetcd's and gRPC's errors
        raise JobFailedError(f"etcd at {endpoint} (cluster.etcd) did not answer: {brief(e)}") from e
    for namespace, count in removed.items():
        if count:
            log.info(
                "removed %d keys an earlier attempt of job %s left in etcd at %s (%s)", count, job, endpoint, namespace
            )


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
        *([f"cluster.attempt={cfg.cluster.attempt}"] if cfg.cluster.attempt is not None else []),
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
