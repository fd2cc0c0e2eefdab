"""Entry point of one trainer rank under torchrun: follows the job's phase and does the trainer's part.

    torchrun --nproc-per-node N -m sidecars.megatron.rank_main <run dir>/trainer-<node>.json

The job's rank 0 waits for each phase through its node's checkpoint engine and tells the other ranks
by a broadcast; every rank then does the work (TP collectives need all of them) and each node's first
rank reports it to its node's engine (only the head's rank 0 writes weights):
TRAIN (RL updates on the last rollout's batch, checkpoint), OFFLOAD, EXPORT (HF tensors into the
node's weight region, in shared memory or on the GPU (`transfer.local`), registered with the engine), ONLOAD
(which first frees a region on the GPU). A fresh run first does the
supervised cold start; a resumed run loads its checkpoint and restarts at EXPORT of that iteration;
ranks that torchrun started again after one died take the running job up at its next trainer phase.
The rank exits at TRAIN of the iteration after the last one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from checkpoint_engine.contracts.acks import AckPayload, ExportAck, MetricsAck, MoveAck
from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.cuda_ipc import DeviceRegionWriter
from checkpoint_engine.contracts.engine_client import EngineClient
from checkpoint_engine.contracts.lifetime import die_with_parent
from checkpoint_engine.contracts.phases import (
    FIRST_PHASE,
    Owner,
    Phase,
    PhaseState,
    next_turn,
    owned_by,
    trained_through,
)
from checkpoint_engine.contracts.run_dir import RunPaths
from checkpoint_engine.contracts.weight_region import RegionWriter
from engine.batch import load_batch
from sidecars.megatron import compat
from sidecars.megatron import model as mg
from sidecars.megatron.config import RankConfig
from sidecars.megatron.offload import Offloader
from sidecars.megatron.parallel import RESTARTS, ParallelConfig, init_distributed, shutdown
from sidecars.megatron.trainer import Trainer

log = logging.getLogger("timeshare.trainer")


def weight_writer(cfg: RankConfig, on_gpu: bool) -> RegionWriter | DeviceRegionWriter:
    """The exporting rank's writer of `cfg.weight_region` (transfer.local, resolved by the launcher)."""
    if cfg.weight_region == "shm":
        return RegionWriter(cfg.job, cfg.node)
    if not on_gpu:  # the launcher's machine has CUDA, this rank's (its container) has not
        raise ConfigError("transfer.local='cuda_ipc' needs the trainer on a GPU and this rank runs on CPU; use 'shm'")
    return DeviceRegionWriter(cfg.job, cfg.node)


def region_lost(state: PhaseState, turn: Phase, weight_region: str) -> bool:
    """A version in GPU memory died with the rank that wrote it: lost for good if vLLM has not loaded it yet
    (the job is between its registration and UPDATE_WEIGHTS' end, and the ranks' next turn is ONLOAD)."""
    waiting = state.phase in (Phase.EXPORT, Phase.START_VLLM, Phase.UPDATE_WEIGHTS)
    return weight_region == "cuda_ipc" and turn is Phase.ONLOAD and waiting


class TakeUpError(RuntimeError):
    """Ranks started again cannot take the running job up (torchrun then starts them again, or gives up)."""


class Rank:
    def __init__(self, cfg: RankConfig) -> None:
        self.cfg, self.paths = cfg, RunPaths(Path(cfg.run_dir))
        self.rank = dist.get_rank()
        self.trainer = Trainer(
            cfg.model_dir,
            cfg.trainer,
            cfg.algo.to_algo(),
            iterations=cfg.run.iterations,
            temperature=cfg.rollout.temperature,
            seed=cfg.run.seed,
            dtype=cfg.dtype,
        )
        self.offloader = Offloader(self.trainer.model, self.trainer.optimizer)
        # Each node's first rank reports its node's trainer phases to the node's engine; the job's first rank
        # (on the head) also waits for the phase for every rank and writes each version's weights.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.client = EngineClient(cfg.engine_url, token=cfg.engine_token) if local_rank == 0 else None
        self.writer = weight_writer(cfg, compat.on_gpu()) if self.rank == 0 and cfg.exports else None
        self.cold_start_seconds = 0.0  # reported with the first EXPORT, whose phase time includes it

    def _log(self, msg: str, *args: Any) -> None:
        log.info(f"[{self.cfg.node} rank{self.rank}] " + msg, *args)

    def _turn(self, iteration: int, phase: Phase) -> PhaseState | None:
        """Wait (rank 0 through the engine) until the job is at `phase` of `iteration`, and share the
        state with every rank; None: the job is elsewhere, stop."""
        found: list[PhaseState | None] = [None]
        if self.rank == 0 and self.client is not None:
            state = self.client.wait_phase(iteration, phase, self.cfg.phase_timeout)
            if (state.iteration, state.phase) == (iteration, phase):
                found = [state]
            else:
                log.error("expected %s of iteration %d, the job is at %s", phase.value, iteration, state)
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def _report(self, iteration: int, phase: Phase, payload: AckPayload) -> None:
        if self.client is not None:
            self.client.complete(iteration, phase, payload)

    def cold_start(self) -> None:
        examples = json.loads(self.paths.cold_start.read_text())
        c = self.cfg.trainer.cold_start
        start = time.perf_counter()
        losses = self.trainer.supervised([tuple(e) for e in examples], c.epochs, c.lr, c.batch_size, c.target_loss)
        self.cold_start_seconds = time.perf_counter() - start
        self._log(
            "cold start: %d examples, %d epochs, loss %s, %.1f s",
            len(examples),
            len(losses),
            " -> ".join(f"{x:.3f}" for x in losses),
            time.perf_counter() - start,
        )

    def train(self, state: PhaseState) -> None:
        """TRAIN learns from the rollout of the version the phase names (`Version.SERVED`); with
        run.mode=rollout_only it learns nothing and checkpoints the weights as they are."""
        iteration = state.iteration
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.cfg.run.mode != "rollout_only":
            batch = load_batch(self.paths.batch(state.weight_version))
            metrics = self.trainer.train_on(batch, rollout_version=state.weight_version)  # refuses an empty batch
        metrics["train/seconds"] = time.perf_counter() - start
        metrics["train/trainer_restarts"] = float(RESTARTS)
        if self.cfg.run.checkpoints_at(iteration):
            self.paths.checkpoint(iteration).mkdir(parents=True, exist_ok=True)
            torch.save(self.trainer.state_dict(), self.paths.trainer_state(iteration, self.rank))
            dist.barrier()
            if self.rank == 0:
                self.paths.train_metrics(iteration).write_text(json.dumps(metrics))
                self.paths.mark_complete(iteration)
        self._report(iteration, Phase.TRAIN, MetricsAck(metrics=metrics))

    def export(self, state: PhaseState) -> None:
        """EXPORT writes the version the phase names (`Version.EXPORTED`)."""
        start = time.perf_counter()
        host = self.offloader.host_parameters() if self.offloader.offloaded else None
        tensors = mg.export_hf_weights(self.trainer.model, self.trainer.arch, host)
        converted = time.perf_counter()
        if self.writer is not None and self.client is not None:
            manifest = self.writer.write(state.weight_version, tensors)
            pushed = time.perf_counter()
            self.client.register_weights(
                manifest,
                ExportAck(
                    convert_seconds=converted - start,
                    push_seconds=pushed - converted,
                    push_gb_per_s=manifest.size / max(pushed - converted, 1e-9) / 1e9,
                    cold_start_seconds=self.cold_start_seconds,
                    weight_version=state.weight_version,
                ),
            )
            self.cold_start_seconds = 0.0
        dist.barrier()

    def _load_checkpoint(self, iteration: int) -> None:
        self.trainer.load_state_dict(torch.load(self.paths.trainer_state(iteration, self.rank), weights_only=False))

    def _begin(self) -> tuple[int, Phase]:
        """The run's start: its checkpoint (a resumed run) or the cold start, then EXPORT of that iteration."""
        first = self.cfg.start_iteration
        if first:
            self._load_checkpoint(first)
        else:
            self.cold_start()
        return first, FIRST_PHASE

    def _take_up(self) -> tuple[int, Phase]:
        """torchrun started this node's ranks again (run.trainer_restarts) while the engine, vLLM, etcd and the
        controller live on: load the checkpoint of the state the job's next trainer phase expects and take
        the job up there. Without that checkpoint (a new run before its first TRAIN, run.checkpoint_every
        > 1) the ranks exit, and once torchrun's restarts are spent the launcher restarts the whole job."""
        found: list[tuple[PhaseState, list[int]] | None] = [None]
        if self.rank == 0 and self.client is not None:
            status = self.client.status()
            found = [(PhaseState.from_dict(status.phase), status.weight_versions)] if status.phase else [None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            raise TakeUpError("restarted, the trainer found no phase in the job to take up")
        state, registered = found[0]
        iteration, phase = next_turn(state, Owner.TRAINER)
        if phase is Phase.EXPORT and iteration in registered:  # EXPORT of i writes version i: it did, then died
            phase = Phase.ONLOAD
        if region_lost(state, phase, self.cfg.weight_region):
            raise TakeUpError(
                f"restarted at {state.phase.value} of iteration {state.iteration}, before vLLM loaded version "
                f"{state.weight_version}, which was in the dead rank's GPU memory (transfer.local=cuda_ipc): "
                "the job has to restart"
            )
        needed = trained_through(iteration, phase)
        if needed not in self.paths.complete_checkpoints():
            raise TakeUpError(
                f"restarted at {phase.value} of iteration {iteration}, the trainer needs the checkpoint of "
                f"iteration {needed}, which was not written (run.checkpoint_every={self.cfg.run.checkpoint_every}"
                f"{', the cold start is not kept' if needed == 0 else ''}): the job has to restart"
            )
        self._load_checkpoint(needed)
        if phase in (Phase.EXPORT, Phase.ONLOAD):  # the job is between OFFLOAD and ONLOAD: off the accelerator
            self.offloader.offload()
        if phase is Phase.EXPORT and self.writer is not None:
            self.writer.discard(iteration)  # what the dead rank began to write, never registered
        self._log("restarted (%d); took up %s of iteration %d from checkpoint %d", RESTARTS, phase, iteration, needed)
        return iteration, phase

    def run(self) -> None:
        iteration, first = self._take_up() if RESTARTS else self._begin()
        phases = owned_by(Owner.TRAINER, starting=first)
        while True:
            for phase in phases:
                if phase is Phase.TRAIN and iteration > self.cfg.run.iterations:
                    self._log("all %d iterations trained; exiting", self.cfg.run.iterations)
                    return
                state = self._turn(iteration, phase)
                if state is None:
                    raise SystemExit(f"the job left the expected phase order at {phase.value} of {iteration}")
                self.HANDLERS[phase](self, state)
            iteration, phases = iteration + 1, owned_by(Owner.TRAINER)

    def offload(self, state: PhaseState) -> None:
        self._report(state.iteration, state.phase, self.offloader.offload())

    def onload(self, state: PhaseState) -> None:
        if self.writer is not None:
            self.writer.release()  # a version in GPU memory: vLLM has loaded it or is gone
        moved = self.offloader.onload() if self.offloader.offloaded else MoveAck(seconds=0.0)
        self._report(state.iteration, state.phase, moved)

    # The trainer's phases (exactly `owned_by(Owner.TRAINER)`), each done by every rank.
    HANDLERS: ClassVar[dict[Phase, Callable[[Rank, PhaseState], None]]] = {
        Phase.TRAIN: train,
        Phase.OFFLOAD: offload,
        Phase.EXPORT: export,
        Phase.ONLOAD: onload,
    }

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.close()


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    die_with_parent()  # torchrun's: a rank never outlives the agent that restarts and stops it
    cfg = RankConfig.from_json_file(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parallel = ParallelConfig(tensor_parallel=cfg.tensor_parallel, expert_parallel=cfg.expert_parallel)
    init_distributed(parallel, seed=cfg.run.seed)
    rank = Rank(cfg)
    try:
        rank.run()
    finally:
        rank.close()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
