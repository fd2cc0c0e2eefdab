"""The checkpoint engine of one node: follows the job's phase in etcd and does this node's part.

Consumes: the phase in etcd (`coordinator.Coordinator`), weight regions that producers on this
node register (`WeightStore`), completion reports of the phases other processes own.
Produces: acks per iteration and phase (payload: timings, loaded version), vLLM started with dummy
weights, updated, and killed. The loop that follows the phase (and, on the leader, advances it once every
node acked) is `phase_loop.PhaseLoop`; this module is what the node does in it.

Who finishes which phase (`contracts.phases.TABLE`):
- the engine's own phases (START_VLLM, UPDATE_WEIGHTS, TERMINATE_VLLM): `HANDLERS`, each begun in
  its turn or, where the table says so (`begins_at`), earlier: `EARLY` begins vLLM's start-up with
  EXPORT and START_VLLM waits for what is left of it;
- EXPORT: the producer, by registering the version's region (`register_weights`); a node without
  a producer (`weights_from` set) acks in its stead (`STAND_INS`) once those nodes registered it;
- TRAIN, OFFLOAD, ROLLOUT, ONLOAD: the trainer / controller, through `complete_phase`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.acks import (
    AckPayload,
    ExportAck,
    ExportWaitAck,
    RestartVllmAck,
    StartVllmAck,
    TerminateVllmAck,
    UpdateWeightsAck,
)
from checkpoint_engine.contracts.engine_api import EngineStatus, NodeAck, NodeAddress, NotNow, PhaseAcks
from checkpoint_engine.contracts.phases import (
    Owner,
    Phase,
    PhaseState,
    begun_at,
    order,
    spec,
)
from checkpoint_engine.contracts.vllm_protocol import UpdateWeightsResponse
from checkpoint_engine.contracts.weight_region import Manifest
from checkpoint_engine.coordination_errors import PhaseFailedError
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.device_memory import GIB, RELEASE_TIMEOUT, DeviceMemoryLeft, GpuMemory, read_gpus, released
from checkpoint_engine.etcd_keys import describe
from checkpoint_engine.mooncake_transport import MooncakeConfig
from checkpoint_engine.phase_loop import PhaseLoop
from checkpoint_engine.vllm_process import VllmProcess
from checkpoint_engine.weight_store import WeightStore

log = logging.getLogger(__name__)

# What the engine does in a phase's turn: the ack's payload.
Handler = Callable[["NodeEngine", PhaseState], AckPayload]


class NodeEngine:
    def __init__(self, cfg: EngineConfig, http_address: str = "") -> None:
        self.cfg = cfg
        self.coordinator = Coordinator(
            cfg.etcd,
            cfg.job,
            cfg.node,
            ttl=cfg.phase.ttl,
            http_address=http_address,
            vllm_address=f"http://{cfg.vllm.host}:{cfg.vllm.port}",
            etcd_outage=cfg.phase.etcd_outage,
            node_grace=cfg.phase.node_grace,
        )
        # Other nodes reach this one's weights through Mooncake at the engine's own address.
        mooncake = MooncakeConfig(protocol=cfg.transfer.protocol, hostname=cfg.host)
        self.store = WeightStore(
            self.coordinator, cfg.job, cfg.node, mooncake if cfg.transfer.kind == "mooncake" else None
        )
        self.vllm = VllmProcess(
            cfg.vllm,
            log_path=Path(cfg.log_dir) / f"vllm-{cfg.node}.log",
            zygote_dir=Path(cfg.vllm_zygote) if cfg.vllm_zygote else None,
        )
        self.loop = PhaseLoop(
            self.coordinator,
            cfg.nodes,
            handler=self._handler,
            begin=self._begin,
            phase_timeout=cfg.phase.timeout,
            start_iteration=cfg.start_iteration,
        )
        self._ops = threading.Lock()  # one vLLM / weight operation at a time (API and phase loop)
        self._thread: threading.Thread | None = None
        self._early_start: Future[float] | None = None  # vLLM start-up begun during EXPORT
        self._start_retries = 0  # failed vLLM starts before the last one that worked
        self.restarts = 0  # vLLMs started again after dying during ROLLOUT
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vllm-start-{cfg.node}")
        self.timings: dict[str, float] = {}
        # Every GPU as NVML saw it before this iteration's vLLM started (None: no NVML, or no start yet).
        self._device_before: list[GpuMemory] | None = None

    @property
    def last_error(self) -> str | None:
        """What last went wrong in this node's part of a phase, or in the leader's barrier."""
        return self.loop.last_error

    # ------------------------------------------------------------------ operations (API and loop)
    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        with self._ops:
            result = fn()
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("%s took %.2f s", name, self.timings[name])
        return result

    def start_vllm(self, state: PhaseState) -> StartVllmAck:
        """START_VLLM: vLLM healthy with dummy weights (its start-up began with EXPORT, see `EARLY`)."""
        early, self._early_start = self._early_start, None
        if early is None and self._keep_alive() and self.vllm.alive():
            return self._wake_vllm()
        waited = time.perf_counter()
        if early is None:
            seconds = self._timed("start_vllm", self._start_vllm_process)
        else:
            seconds = early.result()  # a failed start raises here, in START_VLLM, and fails that phase
            self.timings["start_vllm"] = round(seconds, 3)
        times = self.vllm.startup
        return StartVllmAck(
            pid=self.vllm.pid,
            seconds=seconds,
            waited_seconds=time.perf_counter() - waited,
            import_seconds=times.imports if times else 0.0,
            compile_seconds=times.compile if times else 0.0,
            fork_seconds=times.fork if times else 0.0,
            build_seconds=times.build if times else 0.0,
            retries=self._start_retries,
            device_free_bytes=[g.free for g in self._device_before or []],
        )

    def _wake_vllm(self) -> StartVllmAck:
        """keep_alive: the vLLM of the last rollout serves again, woken where it slept (rollout.sleep_level)."""
        woke = 0.0
        if self.cfg.sleep_level:
            self._device_before = read_gpus()  # what the next sleep must give back
            woke = self._timed("wake_vllm", lambda: self.vllm.client.wake_up().seconds)
        free = [g.free for g in self._device_before or []]
        return StartVllmAck(pid=self.vllm.pid, seconds=woke, kept_alive=True, device_free_bytes=free)

    def begin_vllm_start(self, state: PhaseState) -> None:
        """Begin vLLM's start-up in the background when EXPORT begins (START_VLLM's `begins_at`).

        Not with the version in GPU memory (transfer.local=cuda_ipc): vLLM then starts in its own turn, once
        EXPORT holds the region, so that vLLM sizes its KV cache, and NVML is read before it, with the region
        in place (the trainer frees it at ONLOAD, after TERMINATE_VLLM's check against that reading)."""
        if self.cfg.transfer.exports_on_device:
            return
        if self._early_start is None and not self.vllm.alive():
            self._early_start = self._starter.submit(self._start_vllm_process)

    def _start_vllm_process(self) -> float:
        phase = self.cfg.phase
        if self._device_before is None:  # what TERMINATE_VLLM must give back; a restart in ROLLOUT keeps it
            self._device_before = read_gpus()
        seconds, self._start_retries = self.vllm.start_retrying(phase.vllm_start_timeout, phase.vllm_start_attempts)
        return seconds

    def _keep_alive(self) -> bool:
        return self.cfg.lifecycle == "keep_alive"

    def terminate_vllm(self, state: PhaseState) -> TerminateVllmAck:
        """TERMINATE_VLLM: kill vLLM, or with keep_alive leave it for the next rollout, asleep with
        rollout.sleep_level (GPU), else resident. The zygote stays (respawned here if it died) for the next
        iteration's fork. Either way each GPU must be back within phase.device_margin_gib of what it held
        before vLLM took its memory (NVML; nothing is checked without it)."""
        if self._keep_alive() and self.vllm.alive():
            if not self.cfg.sleep_level:
                return TerminateVllmAck(pids=[], rss_freed_bytes=0, killed=False, kept_alive=True)
            level = self.cfg.sleep_level
            slept = self._timed("sleep_vllm", lambda: self.vllm.client.sleep(level).seconds)
            after = self._device_given_back(f"vLLM (pid {self.vllm.pid}) sleeps at level {level} but holds more")
            free = [g.free for g in after or []]
            return TerminateVllmAck(
                pids=[],
                rss_freed_bytes=0,
                killed=False,
                seconds=slept,
                kept_alive=True,
                slept=level,
                device_free_bytes=free,
            )
        t = self._timed("terminate_vllm", self.vllm.terminate)
        after = self._device_given_back(f"vLLM's tree (pids {list(t.pids)}) is gone, but not its device memory")
        self.vllm.prepare()
        return TerminateVllmAck(
            pids=list(t.pids),
            rss_freed_bytes=t.rss_freed_bytes,
            killed=t.killed,
            seconds=t.seconds,
            device_free_bytes=[g.free for g in after or []],
        )

    def _device_given_back(self, what: str) -> list[GpuMemory] | None:
        """Every GPU now, once back within the margin of before vLLM took its memory; else DeviceMemoryLeft."""
        before, self._device_before = self._device_before, None
        after, left = released(before, int(self.cfg.phase.device_margin_gib * GIB), RELEASE_TIMEOUT)
        if left is not None:
            raise DeviceMemoryLeft(f"{what}: {left}")
        return after

    def register_weights(self, manifest: Manifest, payload: ExportAck) -> None:
        """A producer on this node wrote `manifest`'s region; during EXPORT of that version, this acks it."""
        self._timed("register_weights", lambda: self.store.register(manifest))
        state, _ = self.coordinator.read_phase()
        if state is not None and state.phase is Phase.EXPORT and state.weight_version == manifest.version:
            filled = {"region": manifest.region, "bytes": manifest.size, "on_device": manifest.on_device}
            ack = payload.model_copy(update=filled)
            self.coordinator.ack(state, ack.to_dict())

    def _load(self, version: int) -> UpdateWeightsResponse:
        """vLLM loads `version` from this node's region (pulled from another node if need be)."""
        manifest = self.store.resolve(version)
        loaded = self.vllm.client.update_weights(manifest.to_dict())  # every tensor checked against its checksum
        digest = manifest.digest()
        log.info("vLLM serves weight version %d (checksums verified, digest %s)", loaded.weight_version, digest)
        return loaded

    def update_weights(self, state: PhaseState) -> UpdateWeightsAck:
        """UPDATE_WEIGHTS: the running vLLM loads the version the phase names, checked."""
        version = state.weight_version

        def op() -> UpdateWeightsAck:
            loaded = self._load(version)
            self.store.drop_older_than(version)
            return UpdateWeightsAck(weight_version=loaded.weight_version, load_seconds=round(loaded.seconds, 3))

        return self._timed("update_weights", op)

    def restart_vllm(self, version: int) -> RestartVllmAck:
        """vLLM died or stopped answering during ROLLOUT of `version`: what is left of it goes, a new one
        starts (up to phase.vllm_start_attempts) and loads `version` again from this node's region."""
        state, _ = self.coordinator.read_phase()
        if state is None or state.phase is not Phase.ROLLOUT or state.weight_version != version:
            raise NotNow(f"vLLM is restarted only during ROLLOUT of version {version}; the job is {describe(state)}")

        def op() -> RestartVllmAck:
            self.vllm.terminate()
            started = self._start_vllm_process()
            loaded = self._load(version)
            return RestartVllmAck(
                pid=self.vllm.pid,
                start_seconds=started,
                load_seconds=loaded.seconds,
                weight_version=loaded.weight_version,
                retries=self._start_retries,
            )

        log.warning("vLLM is gone during ROLLOUT of version %d; starting it again", version)
        self.restarts += 1
        return self._timed("restart_vllm", op)

    def complete_phase(self, iteration: int, phase: Phase, payload: AckPayload) -> None:
        """Another process on this node (trainer, controller) finished `phase` of `iteration`."""
        if phase in (Phase.EXPORT, Phase.FAILED) or spec(phase).owner is Owner.ENGINE:
            raise NotNow(f"{phase.value} is completed by the engine itself or by registering weights")
        state, _ = self.coordinator.read_phase()
        if state is None or (state.iteration, state.phase) != (iteration, phase):
            raise NotNow(f"cannot complete {phase.value} of iteration {iteration}: the job is {describe(state)}")
        self.coordinator.ack(state, payload.to_dict())

    def wait_phase(self, iteration: int, phase: Phase, timeout: float) -> PhaseState:
        """The first state at or past `phase` of `iteration` (a process on this node waits for its turn).
        A FAILED job raises PhaseFailedError; nothing within `timeout` raises CoordinationTimeout."""
        target = order(iteration, phase)
        try:
            return self.coordinator.wait_phase(
                lambda s: s.phase is not Phase.FAILED and order(s.iteration, s.phase) >= target, timeout
            )
        except PhaseFailedError as e:  # say why: what the nodes reported they could not do
            causes = self.coordinator.errors(e.state.iteration) or ([self.last_error] if self.last_error else [])
            raise PhaseFailedError(e.state, f"{phase.value} of iteration {iteration}", causes) from e

    def phase_acks(self, iteration: int, phase: Phase) -> PhaseAcks:
        """Every node's ack of `phase` of `iteration`, for the controller's record of the iteration."""
        acks = self.coordinator.iteration_acks(iteration).get(phase, {})
        return PhaseAcks(
            iteration=iteration,
            phase=phase,
            acks={n: NodeAck(node=n, payload=a.payload, acked_at=a.acked_at, error=a.error) for n, a in acks.items()},
        )

    def nodes(self) -> dict[str, NodeAddress]:
        """The job's live nodes: their engine's and their vLLM's addresses (the controller rolls out on all)."""
        return {
            n: NodeAddress(engine=s.http_address, vllm=s.vllm_address)
            for n, s in sorted(self.coordinator.alive_nodes().items())
        }

    def status(self) -> EngineStatus:
        state, _ = self.coordinator.read_phase()
        version = None
        if self.vllm.alive():
            try:
                version = self.vllm.client.health().weight_version
            except OSError:
                version = None
        return EngineStatus(
            node=self.cfg.node,
            leader=self.coordinator.leader(),
            alive_nodes=sorted(self.coordinator.alive_nodes()),
            phase=state.to_dict() if state else None,
            vllm_pid=self.vllm.pid,
            vllm_alive=self.vllm.alive(),
            vllm_zygote=self.vllm.zygote_alive(),
            vllm_weight_version=version,
            vllm_restarts=self.restarts,
            weight_versions=self.store.versions(),
            last_timings=dict(self.timings),
            last_error=self.last_error,
        )

    # ------------------------------------------------------------- the phase loop's work (`phase_loop`)
    def await_exports(self, state: PhaseState) -> ExportWaitAck:
        """EXPORT on a node without a trainer: done once the producing nodes registered the version."""
        version, producers = state.weight_version, self.cfg.weights_from
        found = self.loop.patiently(lambda t: self.coordinator.wait_shards(version, producers, t))
        return ExportWaitAck(registered_by=sorted(found))

    # The engine's own phases (exactly `owned_by(Owner.ENGINE)`), what it does for a phase another owner
    # completes on nodes where that owner is absent, and the work it begins before a phase's turn.
    HANDLERS: ClassVar[dict[Phase, Handler]] = {
        Phase.START_VLLM: start_vllm,
        Phase.UPDATE_WEIGHTS: update_weights,
        Phase.TERMINATE_VLLM: terminate_vllm,
    }
    STAND_INS: ClassVar[dict[Phase, Handler]] = {Phase.EXPORT: await_exports}
    EARLY: ClassVar[dict[Phase, Callable[[NodeEngine, PhaseState], None]]] = {Phase.START_VLLM: begin_vllm_start}

    def _handler(self, phase: Phase) -> Callable[[PhaseState], AckPayload] | None:
        if phase in self.STAND_INS and self.cfg.weights_from:
            return functools.partial(self.STAND_INS[phase], self)
        handler = self.HANDLERS.get(phase)
        return None if handler is None else functools.partial(handler, self)

    def _begin(self, state: PhaseState) -> None:
        """Begin the work of the phases that `state`'s phase starts early (`PhaseSpec.begins_at`)."""
        for phase in begun_at(state.phase):
            self.EARLY[phase](self, state)

    def start(self) -> None:
        self.vllm.prepare()  # the zygote imports while the trainer works: the first START_VLLM forks it too
        self._thread = threading.Thread(target=self.loop.run, name=f"phase-{self.cfg.node}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        log.info("stopping: vLLM, weight regions and the etcd lease go")
        self.coordinator.stop_riding_out()  # a job being stopped may have lost its etcd for good
        self.loop.stop()
        self.vllm.cancel()
        if self._thread:
            self._thread.join(timeout=60)
        self._starter.shutdown(wait=True)  # a start in progress gives up once cancelled
        self.vllm.close()
        self.store.close()
        self.coordinator.close()
