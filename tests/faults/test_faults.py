"""The fault suite: each test kills processes of a real run (etcd, engine, torchrun ranks, vLLM) at chosen
phases and checks that the run heals: every iteration completes, it trained on the prompts an uninterrupted
run samples (none lost, none repeated), and no process or /dev/shm entry outlives it.

Faults healed in the run itself: vLLM killed during its start-up, and during ROLLOUT; etcd killed (started
again on its data directory); a trainer rank killed (torchrun starts the node's ranks again from a checkpoint).
Faults healed by the launcher restarting the job's processes from the newest checkpoint: the checkpoint engine
killed, a trainer rank killed with run.trainer_restarts=0, in a job of several nodes, or with no checkpoint to
take the job up from. Faults that stop the job cleanly, resumed from the newest checkpoint: the launcher
killed by SIGKILL, Ctrl-C to its process group, SIGINT to the launcher alone. `pytest tests/faults` ends with
one summary line (see conftest.py).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from checkpoint_engine.contracts.phases import Phase, successor
from checkpoint_engine.contracts.run_dir import RunPaths
from launch.etcd_server import LocalEtcd
from tests.faults.conftest import Fault, FaultReport
from tests.faults.injection import (
    SHM,
    find_zygote,
    kill_next_sidecar,
    kill_process,
    kill_trainer_rank,
    kill_vllm,
    leftovers,
    prompts_against_uninterrupted,
    wait_for_phase,
)
from tests.integration.train_job import ITERATIONS, OVERRIDES, POOL, PROMPTS, SEED, await_exit, launch, rows, whole_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _in_background(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def _account(fault: Fault, paths: RunPaths, rollouts: int, shm_before: set[Path]) -> None:
    """The run ended whole: fill `fault`'s prompt and leak counts and assert they are zero."""
    count = prompts_against_uninterrupted(paths, rollouts, POOL, PROMPTS, SEED)
    left = leftovers(paths.root, shm_before)
    fault.lost, fault.repeated, fault.leaks = count.lost, count.repeated, len(left)
    fault.survived = True
    assert (count.lost, count.repeated) == (0, 0)
    assert not left, left
    logged = [int(r["iteration"]) for r in rows(paths)]
    assert logged == sorted(set(logged)) == list(range(rollouts + 1)), "an iteration missing or logged twice"


def test_vllm_killed_during_its_start_is_started_again(tmp_path: Path, faults: FaultReport) -> None:
    shm = set(SHM.iterdir())
    fault = faults.injected("vLLM SIGKILLed in START_VLLM")
    killer = _in_background(lambda: kill_next_sidecar(find_zygote(tmp_path)))
    paths = whole_run(tmp_path, "run.iterations=1")
    killer.join(timeout=1)
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert history[0]["vllm/start_retries"] == 1
    assert history[0]["rollout/weight_version"] == 0
    fault.recovery_seconds = history[0]["time/start_vllm"]
    _account(fault, paths, 1, shm)


@pytest.mark.parametrize(("node", "cluster"), [("node0", "local"), ("node1", "local2")])
def test_vllm_killed_during_rollout_is_restarted_and_the_rollout_goes_on(
    tmp_path: Path, faults: FaultReport, node: str, cluster: str
) -> None:
    """A vLLM SIGKILLed in ROLLOUT of iteration 1 is started again by its node's engine, asked by the head's
    controller (node1's through the engine it registered in etcd), and the rollout goes on without a restart
    of the job."""
    shm = set(SHM.iterdir())
    whose = "" if node == "node0" else f"{node}'s "
    fault = faults.injected(f"{whose}vLLM SIGKILLed in ROLLOUT")
    killer = _in_background(lambda: kill_vllm(wait_for_phase(tmp_path, 1, "ROLLOUT"), node))
    paths = whole_run(tmp_path, "run.iterations=2", f"cluster={cluster}")
    killer.join(timeout=1)
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["vllm/restarts"] for i in range(3)] == [0, 1, 0]
    assert [history[i]["job/restarts"] for i in range(3)] == [0, 0, 0]
    assert f"vLLM of {node} lost in ROLLOUT of version 1" in (tmp_path / "launcher.log").read_text()
    assert [history[i]["rollout/weight_version"] for i in range(2)] == [0, 1]
    assert max(r["logprob_gap/mean_abs"] for r in history.values() if "logprob_gap/mean_abs" in r) < 1e-3
    fault.recovery_seconds = history[1]["vllm/restart_seconds"]
    _account(fault, paths, 2, shm)


@pytest.mark.parametrize(
    ("iteration", "phase", "took_up", "layout"),
    [
        (2, "TRAIN", "TRAIN of iteration 2 from checkpoint 1", []),
        (1, "ROLLOUT", "ONLOAD of iteration 1 from checkpoint 1", []),
        (2, "TRAIN", "TRAIN of iteration 2 from checkpoint 1", ["parallel.trainer_tp=2"]),  # both ranks start again
    ],
)
def test_a_trainer_rank_killed_is_started_again_alone_and_takes_the_job_up(
    tmp_path: Path, faults: FaultReport, iteration: int, phase: str, took_up: str, layout: list[str]
) -> None:
    """A trainer rank SIGKILLed in `phase` of `iteration` (with TP 2, one of two): torchrun starts the node's
    ranks again (run.trainer_restarts), they load the checkpoint the job's next trainer phase needs and take it up,
    while etcd, the engine, vLLM and the controller go on: no restart of the job, every iteration logged once,
    `train/trainer_restarts` 1 from the next TRAIN on. Recovery: from the kill to the job past that phase."""
    shm = set(SHM.iterdir())
    fault = faults.injected(f"trainer rank SIGKILLed in {phase}, started again alone")
    killed: list[float] = []

    def kill() -> None:
        run_dir = wait_for_phase(tmp_path, iteration, phase)
        killed.append(time.time())
        kill_trainer_rank(run_dir)
        wait_for_phase(tmp_path, *successor(iteration, Phase(phase)))
        fault.recovery_seconds = time.time() - killed[0]

    killer = _in_background(kill)
    paths = whole_run(tmp_path, "run.iterations=3", "trainer.updates_per_batch=100", *layout)
    killer.join(timeout=5)
    assert killed, "the fault was never injected"
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["job/restarts"] for i in range(4)] == [0, 0, 0, 0]
    assert [history[i]["train/trainer_restarts"] for i in range(1, 4)] == [0, 1, 1]
    assert f"took up {took_up}" in (paths.logs / "trainer-node0.log").read_text()
    assert "restarting from" not in (tmp_path / "launcher.log").read_text()
    _account(fault, paths, 3, shm)


def test_a_trainer_rank_that_cannot_take_the_job_up_restarts_the_job(tmp_path: Path, faults: FaultReport) -> None:
    """Killed in ROLLOUT of iteration 0, before any checkpoint (the cold start is not kept), a rank started again
    by torchrun cannot load the state ONLOAD 0 needs: it exits saying so, and once run.trainer_restarts are
    spent the launcher restarts the job from the start, which completes."""
    shm = set(SHM.iterdir())
    fault = faults.injected("trainer rank SIGKILLed in ROLLOUT of iteration 0, no checkpoint to take up from")
    killer = _in_background(lambda: kill_trainer_rank(wait_for_phase(tmp_path, 0, "ROLLOUT")))
    paths = whole_run(tmp_path, "run.iterations=1", "run.trainer_restarts=1")
    killer.join(timeout=5)
    trainer_log = (paths.logs / "trainer-node0.log").read_text()
    assert (
        "TakeUpError: restarted at ONLOAD of iteration 0, the trainer needs the checkpoint of iteration 0"
        in trainer_log
    )
    restart = "the trainer exited with status 1 (TakeUpError: restarted at ONLOAD of iteration 0"
    assert restart in (launcher := (tmp_path / "launcher.log").read_text())
    assert "restarting from the start, as no checkpoint was written yet" in launcher
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["job/restarts"] for i in range(2)] == [1, 1]
    _account(fault, paths, 1, shm)


@pytest.mark.parametrize(
    ("process", "args", "iteration", "phase", "newest", "cluster", "etcd"),
    [
        ("trainer rank", ["sidecars.megatron.rank_main"], 2, "TRAIN", 1, "local", "the cluster's"),
        ("checkpoint engine", ["launch.cli engine"], 2, "START_VLLM", 2, "local", "the launcher's"),
        pytest.param(
            "node1's checkpoint engine",
            ["launch.cli engine", "engine-node1.json"],
            0,
            "ROLLOUT",
            0,
            "local2",
            "the launcher's",
            marks=pytest.mark.extended,
        ),
        pytest.param(
            "node1's trainer rank",
            ["sidecars.megatron.rank_main", "trainer-node1.json"],
            2,
            "TRAIN",
            1,
            "local2",
            "the launcher's",
            marks=pytest.mark.extended,
        ),
    ],
)
def test_a_process_killed_restarts_the_job_from_its_newest_checkpoint(
    tmp_path: Path,
    faults: FaultReport,
    process: str,
    args: list[str],
    iteration: int,
    phase: str,
    newest: int,
    cluster: str,
    etcd: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Killed in `iteration`, the process's death stops that attempt and the launcher starts the job's processes
    again from the newest checkpoint (1 during TRAIN of iteration 2, which writes checkpoint 2; the start, 0,
    before the first), node1 too in cluster=local2 (`resume=` the run): the run completes, each iteration
    logged once, `job/restarts` 1 from the restart on, and nothing the dead processes left. On the cluster's
    etcd (`cluster.etcd`, which outlives an attempt) the restart first removes the keys the failed one left.
    With run.trainer_restarts=0 a dead trainer rank is not started again alone: the comparison with the test
    above. Recovery: from the kill to the restarted job past the phase it struck."""
    shm = set(SHM.iterdir())
    external = etcd == "the cluster's"
    where = ("" if iteration else " of iteration 0") + (" on the cluster's etcd" if external else "")
    fault = faults.injected(f"{process} SIGKILLed in {phase}{where}")
    killed: list[float] = []
    newest_at_kill: list[int] = []  # the newest complete checkpoint when the kill landed (0: none yet)

    def kill() -> None:
        run_dir = wait_for_phase(tmp_path, iteration, phase)
        killed.append(time.time())
        kill_process(run_dir, *args, unless="torch.distributed.run")  # a rank, not torchrun
        newest_at_kill.append(max(RunPaths(run_dir).complete_checkpoints(), default=0))
        wait_for_phase(tmp_path, *successor(iteration, Phase(phase)), since=killed[0])  # the restarted job, past it
        fault.recovery_seconds = time.time() - killed[0]

    killer = _in_background(kill)
    with ExitStack() as stack:
        overrides = [f"cluster={cluster}", "run.trainer_restarts=0"]  # a dead rank ends the attempt
        if phase == "TRAIN":  # its 2 steps take 0.4 s, a window a loaded machine misses; 100 take seconds
            overrides.append("trainer.updates_per_batch=100")
        if external:
            server = stack.enter_context(LocalEtcd(tmp_path_factory.mktemp("etcd")))
            overrides.append(f"cluster.etcd={server.endpoint}")
        paths = whole_run(tmp_path, "run.iterations=3", *overrides)
    killer.join(timeout=5)
    assert killed, "the fault was never injected"
    assert newest_at_kill == [newest], f"the kill landed with checkpoint {newest_at_kill} the newest, not {newest}"
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["job/restarts"] for i in range(4)] == [int(i >= newest) for i in range(4)]
    if external:
        assert f"an earlier attempt of job {paths.root.name} left in etcd" in (tmp_path / "launcher.log").read_text()
    if cluster == "local2":
        assert [history[i]["vllm/weight_version/node1"] for i in range(4)] == [0, 1, 2, 3]
    start = f"the checkpoint of iteration {newest}" if newest else "the start, as no checkpoint was written yet"
    line = f"restarting from {start} (restart 1 of run.restarts=2)"
    assert line in (tmp_path / "launcher.log").read_text()
    _account(fault, paths, 3, shm)


def test_etcd_killed_is_started_again_on_its_data_and_the_phase_goes_on(tmp_path: Path, faults: FaultReport) -> None:
    """etcd SIGKILLed during START_VLLM of iteration 1: the launcher starts it again on its data directory and
    port, the engines ride out the gap, and the job carries on without a restart of its own."""
    shm = set(SHM.iterdir())
    fault = faults.injected("etcd SIGKILLed in START_VLLM")
    killed: list[float] = []

    def kill() -> None:
        run_dir = wait_for_phase(tmp_path, 1, "START_VLLM")
        killed.append(time.monotonic())
        kill_process(run_dir, "etcd --name=timeshare")
        wait_for_phase(tmp_path, 1, "ROLLOUT")  # START_VLLM and UPDATE_WEIGHTS done
        fault.recovery_seconds = time.monotonic() - killed[0]

    killer = _in_background(kill)
    paths = whole_run(tmp_path)
    killer.join(timeout=5)
    assert killed, "the fault was never injected"
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["etcd/restarts"] for i in range(3)] == [0, 1, 1]
    assert [history[i]["job/restarts"] for i in range(3)] == [0, 0, 0]
    _account(fault, paths, 2, shm)


def test_a_node_that_stalls_past_its_lease_is_waited_for(tmp_path: Path, faults: FaultReport) -> None:
    """cluster=local2 with 2 s leases: node1's engine is stopped (SIGSTOP) in ROLLOUT of iteration 1 for three
    leases' time, so its lease runs out; once continued it registers again, and the head, which waits
    phase.node_grace for it, carries on: every iteration completes on both nodes."""
    shm = set(SHM.iterdir())
    fault = faults.injected("node1's engine stalled past its lease in ROLLOUT")
    stalled: list[float] = []

    def stall() -> None:
        run_dir = wait_for_phase(tmp_path, 1, "ROLLOUT")
        pid = kill_process(run_dir, "launch.cli engine", "engine-node1.json", sig=signal.SIGSTOP)
        stalled.append(time.monotonic())
        time.sleep(6)
        os.kill(pid, signal.SIGCONT)
        wait_for_phase(tmp_path, 2, "TRAIN")
        fault.recovery_seconds = time.monotonic() - stalled[0] - 6  # after it was continued

    staller = _in_background(stall)
    paths = whole_run(tmp_path, "cluster=local2", "phase.ttl=2")
    staller.join(timeout=5)
    assert stalled, "the fault was never injected"
    stalled_log = (paths.logs / "engine-node1.log").read_text()
    assert "LEASE EXPIRED" in stalled_log
    gaps = [float(s) for s in re.findall(r"no Python code of this process ran for ([\d.]+) s", stalled_log)]
    assert max(gaps, default=0.0) > 5, "the stalled engine did not report its stall"
    assert "node node1 has a live lease again" in (paths.logs / "engine-node0.log").read_text()
    history = {int(r["iteration"]): r for r in rows(paths)}
    assert [history[i]["vllm/weight_version/node1"] for i in range(3)] == [0, 1, 2]
    assert [history[i]["job/restarts"] for i in range(3)] == [0, 0, 0]
    _account(fault, paths, 2, shm)


@pytest.mark.extended
def test_stopped_by_sigkill_and_ctrl_c_the_job_leaves_nothing_and_resumes(tmp_path: Path, faults: FaultReport) -> None:
    """The launcher is SIGKILLed in iteration 1, the resumed run gets Ctrl-C (SIGINT to its process group)
    in iteration 2, the next SIGINT to the launcher's pid alone in iteration 3; each stop leaves no process
    and no /dev/shm entry, and the last resume finishes the run."""
    shm = set(SHM.iterdir())
    log = tmp_path / "launcher.log"

    def stop_at(args: list[str], iteration: int, how: str) -> RunPaths:
        fault = faults.injected(f"launcher {how} in ROLLOUT")
        proc = launch(args, log, start_new_session=True)  # a terminal's job: its own process group
        run_dir = wait_for_phase(tmp_path, iteration, "ROLLOUT")
        stopped = time.monotonic()
        if how == "SIGKILLed":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            (os.killpg if how == "Ctrl-C" else os.kill)(proc.pid, signal.SIGINT)
        expected = -signal.SIGKILL if how == "SIGKILLed" else 130
        await_exit(proc, log, status=expected, timeout=120)
        left = leftovers(run_dir, shm)
        fault.recovery_seconds, fault.leaks = time.monotonic() - stopped, len(left)
        assert not left, f"left behind by a launcher {how}: {left}"
        if how != "SIGKILLed":
            line = log.read_text().splitlines()[-1]
            assert line == f"timeshare train: interrupted; continue with `timeshare train resume={run_dir}`"
        fault.survived = True  # counted once the resumed run below finishes
        return RunPaths(run_dir)

    paths = stop_at([*OVERRIDES, f"run.root={tmp_path}"], 1, "SIGKILLed")
    assert paths.latest_checkpoint() == 1
    stop_at([f"resume={paths.root}"], 2, "Ctrl-C")
    assert paths.latest_checkpoint() == 2
    stop_at([f"resume={paths.root}"], ITERATIONS, "SIGINT")
    await_exit(launch([f"resume={paths.root}"], log), log)
    count = prompts_against_uninterrupted(paths, ITERATIONS, POOL, PROMPTS, SEED)
    last = faults.faults[-1]
    last.lost, last.repeated = count.lost, count.repeated
    assert (count.lost, count.repeated) == (0, 0)
    logged = [int(r["iteration"]) for r in rows(paths)]
    assert logged == list(range(ITERATIONS + 1)), "an iteration missing or logged twice"
    assert not leftovers(paths.root, shm)


def test_a_start_that_fails_every_attempt_fails_the_job_at_once_with_its_cause(tmp_path: Path) -> None:
    """With one attempt (phase.vllm_start_attempts=1), a sidecar killed during its start-up fails
    START_VLLM at once (the engine's error ack; phase.timeout is 900 s), and the launcher ends with
    one line naming the node, the phase and the cause; no checkpoint exists yet and run.restarts=0 forbids
    starting over, so it says to start again."""
    killer = _in_background(lambda: kill_next_sidecar(find_zygote(tmp_path)))
    log = tmp_path / "launcher.log"
    args = [*OVERRIDES, f"run.root={tmp_path}", "run.iterations=1", "phase.vllm_start_attempts=1", "run.restarts=0"]
    proc = launch(args, log)
    await_exit(proc, log, status=1, timeout=300)
    killer.join(timeout=1)
    (line,) = [s for s in log.read_text().splitlines() if s.startswith("timeshare train: ")][-1:]
    assert "node0 in START_VLLM: VllmStartError: vLLM (pid" in line
    assert "exited during start-up" in line
    assert line.endswith("no checkpoint was written, so start the run again")
