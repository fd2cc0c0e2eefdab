"""One node's processes, alike on the head and on every other node: its checkpoint engine and its trainer
ranks (torchrun: `--nnodes` over the job's nodes, this node's `--node-rank`, the rendezvous on the head).

`start_node` starts both under an ExitStack that stops them; `run_worker` is all a node after the head
does: wait for the head's run directory, start its processes, wait for its trainer to finish. The head
adds etcd, the controller and the run directory (`launch/train.py`).
"""

from __future__ import annotations

import ipaddress
import secrets
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.engine_client import EngineClient, JobFailedError
from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.process_group import ProcessGroup, last_error
from engine.config import RolloutConfig
from launch.config_loading import resumed_config
from launch.etcd_server import free_loopback_ports
from launch.train_config import TrainConfig
from sidecars.megatron.config import RankConfig

# The engine's own shutdown (vLLM killed, weight regions removed, lease revoked) before it is killed.
ENGINE_STOP_GRACE = 30.0


@dataclass
class Node:
    """A node's running engine (and a client of it) and trainer ranks."""

    name: str
    engine: ProcessGroup
    client: EngineClient
    trainer: ProcessGroup
    logs: Path

    def check_engine(self) -> None:
        check_exited("checkpoint engine", self.engine, self.logs / f"engine-{self.name}.log")

    def check_alive(self) -> None:
        check_exited("trainer", self.trainer, self.logs / f"trainer-{self.name}.log")
        self.check_engine()


def check_exited(name: str, proc: ProcessGroup, log_path: Path) -> None:
    """Raise `JobFailedError` when `proc` has exited: its status and the last error its log names."""
    if proc.poll() is not None:
        raise JobFailedError(f"the {name} exited with status {proc.returncode} ({last_error(log_path)})")


def start_node(
    stack: ExitStack,
    cfg: TrainConfig,
    paths: RunPaths,
    model_dir: Path,
    *,
    etcd: str,
    rollout: RolloutConfig,
    start: int,
    trainer_port: int,
) -> Node:
    """This node's engine (answering) and trainer ranks, stopped when `stack` unwinds. Every child dies with
    this process, even one killed by SIGKILL: SIGTERM lets the engine stop vLLM and remove its regions,
    and torchrun stop the ranks."""
    here, node = cfg.cluster, cfg.cluster.node
    ports = free_loopback_ports(2)
    engine_port, vllm_port = here.engine_port or ports[0], here.vllm_port or ports[1]
    token = None if ipaddress.ip_address(here.address).is_loopback else secrets.token_urlsafe(16)
    region = cfg.local_region(has_cuda=_has_cuda())
    engine_cfg = _engine_config(
        cfg,
        paths,
        model_dir,
        etcd,
        rollout=rollout,
        start=start,
        token=token,
        ports=(engine_port, vllm_port),
        region=region,
    )
    engine_file = engine_cfg.to_json_file(paths.engine_config(node))
    engine_log = paths.logs / f"engine-{node}.log"
    engine = ProcessGroup.spawn(
        [sys.executable, "-m", "launch.cli", "engine", str(engine_file)], engine_log, parent_death=signal.SIGTERM
    )
    stack.callback(engine.stop, ENGINE_STOP_GRACE)
    client = EngineClient(f"http://{here.address}:{engine_port}", token=token)
    stack.callback(client.close)
    client.wait_for_engine(timeout=120, before_poll=lambda: check_exited("checkpoint engine", engine, engine_log))

    rank_cfg = _rank_config(cfg, paths, model_dir, client.base_url, token, rollout=rollout, start=start, region=region)
    rank_file = rank_cfg.to_json_file(paths.root / f"trainer-{node}.json")
    env = {"GLOO_SOCKET_IFNAME": here.interface} if here.interface else {}
    # torchrun: this node's place among the job's nodes, its ranks, and the rendezvous on the head
    place = ["--nnodes", str(len(here.nodes)), "--node-rank", str(here.nodes.index(node))]
    # One node's ranks are started again in place (run.trainer_restarts); several nodes' restart with the job.
    restarts = cfg.run.trainer_restarts if len(here.nodes) == 1 else 0
    ranks = ["--nproc-per-node", str(cfg.parallel.trainer_ranks), "--max-restarts", str(restarts)]
    rendezvous = ["--master-addr", here.head_address, "--master-port", str(trainer_port)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *place, *ranks, *rendezvous]
    trainer = ProcessGroup.spawn(
        [*torchrun, "-m", "sidecars.megatron.rank_main", str(rank_file)],
        paths.logs / f"trainer-{node}.log",
        env=env,
        parent_death=signal.SIGTERM,
    )
    stack.callback(trainer.stop, 30)
    return Node(name=node, engine=engine, client=client, trainer=trainer, logs=paths.logs)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _engine_config(
    cfg: TrainConfig,
    paths: RunPaths,
    model_dir: Path,
    etcd: str,
    *,
    rollout: RolloutConfig,
    start: int,
    token: str | None,
    ports: tuple[int, int],
    region: Literal["shm", "cuda_ipc"],
) -> EngineConfig:
    """This node's engine, from the run's sections (the engine reads them as one JSON file); `rollout` is
    the effective one (long-context preset applied), `region` the resolved transfer.local. A node after the
    head loads the head's exports."""
    here = cfg.cluster
    return EngineConfig(
        node=here.node,
        job=here.namespace(paths.root.name),
        etcd=etcd,
        nodes=here.nodes,
        start_iteration=start,
        weights_from=() if here.is_head else (here.head,),
        log_dir=str(paths.logs),
        vllm_zygote=here.vllm_zygote,
        host=here.address,
        port=ports[0],
        token=token,
        lifecycle=rollout.lifecycle,
        sleep_level=rollout.sleep_level,
        phase=cfg.phase,
        transfer=cfg.transfer.model_copy(update={"local": region}),
        vllm=cfg.vllm_settings(model_dir, host=here.address, port=ports[1]),
    )


def _rank_config(
    cfg: TrainConfig,
    paths: RunPaths,
    model_dir: Path,
    engine_url: str,
    token: str | None,
    *,
    rollout: RolloutConfig,
    start: int,
    region: Literal["shm", "cuda_ipc"],
) -> RankConfig:
    """What every trainer rank of this node runs from (`trainer-<node>.json`); `rollout` is the effective one."""
    return RankConfig(
        run_dir=str(paths.root),
        model_dir=str(model_dir),
        engine_url=engine_url,
        engine_token=token,
        job=cfg.cluster.namespace(paths.root.name),
        node=cfg.cluster.node,
        exports=cfg.cluster.is_head,
        weight_region=region,
        start_iteration=start,
        tensor_parallel=cfg.parallel.trainer_tp,
        expert_parallel=cfg.parallel.trainer_ep,
        dtype=cfg.model.dtype,
        phase_timeout=cfg.phase.timeout,
        run=cfg.run,
        rollout=rollout,
        trainer=cfg.trainer,
        algo=cfg.algo,
    )


def resume_point(paths: RunPaths) -> int:
    """The iteration a resumed run starts from: its newest sound checkpoint, the same on every node (they read
    one run directory); a ConfigError when there is none."""
    if not paths.config.exists():
        raise ConfigError(f"resume={paths.root}: not a run directory (no {paths.config.name})")
    start = paths.latest_checkpoint()  # warns about newer damaged ones
    if start is None:
        damaged = " sound" if paths.complete_checkpoints() else " complete"
        raise ConfigError(f"resume={paths.root}: the run has no{damaged} checkpoint; start it again instead")
    return start


def run_worker(cfg: TrainConfig, overrides: list[str]) -> int:
    """A node after the head: its engine and trainer ranks in the head's run directory until its trainer ends.
    With `resume=`, the run's saved config with this node's cluster section, from the newest checkpoint."""
    here = cfg.cluster
    if cfg.resume is None:
        paths, start = RunPaths(Path(cfg.run.root) / str(here.job)), 0
        _await_head(paths, cfg.phase.timeout)
    else:
        paths = RunPaths(Path(cfg.resume))
        start = resume_point(paths)
        cfg = resumed_config(cfg, overrides, paths.config, paths.root.name)
    model_dir = paths.model_init if cfg.model.path is None else Path(cfg.model.path)
    etcd = here.etcd or f"{here.head_address}:{here.etcd_port}"
    print(f"timeshare train: {here.node} of job {paths.root.name} in {paths.root}, from iteration {start}", flush=True)
    try:
        with ExitStack() as stack:
            node = start_node(
                stack,
                cfg,
                paths,
                model_dir,
                etcd=etcd,
                rollout=cfg.effective_rollout(),
                start=start,
                trainer_port=here.trainer_port,
            )
            while node.trainer.poll() is None:
                node.check_engine()
                time.sleep(0.5)
            if node.trainer.returncode != 0:
                node.check_alive()
    except KeyboardInterrupt:
        print(f"timeshare train: {here.node} interrupted", flush=True)
        return 130
    except JobFailedError as e:
        print(f"timeshare train: {here.node}: {e}; logs in {paths.logs}", flush=True)
        return 1
    print(f"timeshare train: {here.node} done", flush=True)
    return 0


def _await_head(paths: RunPaths, timeout: float) -> None:
    """The head writes the cold start's examples last, before it starts its own processes."""
    if poll_until(lambda: paths.cold_start.exists() or None, timeout, every=0.5) is None:
        raise JobFailedError(f"the head did not prepare {paths.root} within {timeout:g} s (phase.timeout)")
