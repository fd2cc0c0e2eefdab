"""ProcessGroup against real, tiny Python processes: its own session, SIGTERM then SIGKILL, a killed root's
orphans reaped through the remembered tree, and a repeated stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from checkpoint_engine import process_group
from checkpoint_engine.process_group import ProcessGroup

pytestmark = pytest.mark.timeout(30)
GRACE = 0.3

# argv[1]: a file written once SIGTERM is ignored (so the test never signals too early); argv[2]: "setsid" or not.
_STUBBORN = (
    "import os, signal, sys, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "sys.argv[2] == 'setsid' and os.setsid(); pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(20)"
)


def _root(ready: Path, *, root_ignores_term: bool, grandchild_setsid: bool = False) -> list[str]:
    """A root that starts one SIGTERM-ignoring grandchild and sleeps."""
    handler = "signal.SIG_IGN" if root_ignores_term else "signal.SIG_DFL"
    program = (
        f"import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, {handler}); "
        f"subprocess.Popen([sys.executable, '-c', {_STUBBORN!r}, {str(ready)!r}, "
        f"{'setsid' if grandchild_setsid else '-'!r}]); time.sleep(60)"
    )
    return [sys.executable, "-c", program]


def _wait_for(path: Path) -> int:
    """The pid the grandchild wrote once it ignores SIGTERM."""
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return int(path.read_text())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for init to reap it
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def _no_reap_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check that processes exit; when init reaps the orphans is its own business (1.5 s here)."""
    monkeypatch.setattr(process_group, "REAP_WAIT", 0.0)


@pytest.fixture
def groups():
    """Groups a test spawns; any left running by a failed test is killed."""
    spawned: list[ProcessGroup] = []
    yield spawned
    for g in spawned:
        for p in g.known():
            p.kill()
        g.stop(0)


def test_child_leads_its_own_session_with_log_and_env(tmp_path: Path, groups) -> None:
    log = tmp_path / "child.log"
    log.write_text("earlier run\n")
    program = "import os; print(os.environ['PG_TEST'], os.getsid(0), os.getpgid(0), os.readlink('/proc/self/fd/0'))"
    g = ProcessGroup.spawn([sys.executable, "-c", program], log, env={"PG_TEST": "added"}, cwd=tmp_path)
    groups.append(g)
    assert g.wait(timeout=10) == 0
    assert g.returncode == 0
    # Session and group both led by the child; stdin is /dev/null; the log is appended to, not replaced.
    assert log.read_text() == f"earlier run\nadded {g.pid} {g.pid} /dev/null\n"
    assert os.getsid(os.getpid()) != g.pid


def test_well_behaved_child_stops_on_sigterm(tmp_path: Path, groups) -> None:
    g = ProcessGroup.spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    groups.append(g)
    assert g.alive()
    stopped = g.stop(grace=10)
    assert stopped.pids == (g.pid,)
    assert not stopped.killed
    assert stopped.seconds < 5
    assert stopped.rss_freed_bytes > 0
    assert g.returncode == -signal.SIGTERM
    assert not g.alive()


def test_tree_ignoring_sigterm_is_killed(tmp_path: Path, groups) -> None:
    ready = tmp_path / "ready"
    g = ProcessGroup.spawn(_root(ready, root_ignores_term=True), tmp_path / "log")
    groups.append(g)
    grandchild = _wait_for(ready)
    assert [p.pid for p in g.tree()] == [g.pid, grandchild]
    stopped = g.stop(grace=GRACE)
    assert stopped.killed
    assert stopped.seconds >= GRACE
    assert set(stopped.pids) == {g.pid, grandchild}
    assert g.returncode == -signal.SIGKILL
    assert _gone(grandchild)


def test_orphans_of_a_killed_root_are_reaped_through_the_remembered_tree(tmp_path: Path, groups) -> None:
    ready = tmp_path / "ready"
    g = ProcessGroup.spawn(_root(ready, root_ignores_term=False), tmp_path / "log")
    groups.append(g)
    grandchild = _wait_for(ready)
    g.remember_tree()
    os.kill(g.pid, signal.SIGKILL)
    g.wait(timeout=10)
    assert g.tree() == []  # the orphan is no longer anyone's descendant we can see
    assert not _gone(grandchild)
    stopped = g.stop(grace=GRACE)
    assert stopped.pids == (grandchild,)
    assert stopped.killed  # it ignores SIGTERM: only the SIGKILL that followed could end it
    assert _gone(grandchild)


def test_grandchild_that_left_the_group_is_killed_by_pid(tmp_path: Path, groups) -> None:
    ready = tmp_path / "ready"
    g = ProcessGroup.spawn(_root(ready, root_ignores_term=False, grandchild_setsid=True), tmp_path / "log")
    groups.append(g)
    grandchild = _wait_for(ready)
    assert os.getpgid(grandchild) != g.pid  # out of reach of the group signal
    g.remember_tree()
    stopped = g.stop(grace=GRACE)
    assert set(stopped.pids) == {g.pid, grandchild}
    assert stopped.killed
    assert _gone(grandchild)


def test_group_sigkill_reaches_a_child_started_after_the_tree_was_seen(tmp_path: Path, groups) -> None:
    ready, log = tmp_path / "ready", tmp_path / "log"
    # The root answers SIGTERM by starting a child that stop's scan of the tree never saw.
    late_child = f"subprocess.Popen([sys.executable, '-c', {_STUBBORN!r}, {str(ready)!r}, '-'])"
    program = (
        f"import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, lambda *_: {late_child}); "
        "print('handler set', flush=True); time.sleep(60)"
    )
    g = ProcessGroup.spawn([sys.executable, "-c", program], log)
    groups.append(g)
    deadline = time.monotonic() + 10
    while "handler set" not in log.read_text():
        assert time.monotonic() < deadline, "the root never installed its SIGTERM handler"
        time.sleep(0.01)
    stopped = g.stop(grace=1.5)
    assert stopped.killed
    assert stopped.pids == (g.pid,)
    late = _wait_for(ready)  # started within the grace period, so before the SIGKILL
    deadline = time.monotonic() + 5
    while not _gone(late):
        assert time.monotonic() < deadline, "a group member unknown to stop survived its SIGKILL"
        time.sleep(0.01)


def test_stop_twice_is_harmless(tmp_path: Path, groups) -> None:
    g = ProcessGroup.spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    groups.append(g)
    first = g.stop(grace=10)
    second = g.stop(grace=10)
    assert first.pids == (g.pid,)
    assert (second.pids, second.rss_freed_bytes, second.killed) == ((), 0, False)
    assert g.returncode == -signal.SIGTERM


@pytest.mark.parametrize("spawner", ["main thread", "other thread"])
def test_a_child_spawned_with_parent_death_dies_with_a_killed_parent(tmp_path: Path, spawner: str) -> None:
    """The launcher's case: a parent killed by SIGKILL cannot stop its children; the kernel's signal does, armed
    between fork and exec by the main thread, through setpriv by another (the etcd watchdog's)."""
    pid_file = tmp_path / "child.pid"
    start = "threading.Thread(target=spawn).start()" if spawner == "other thread" else "spawn()"
    program = f"""
import pathlib, signal, sys, threading, time
from checkpoint_engine.process_group import ProcessGroup

def spawn():
    g = ProcessGroup.spawn([sys.executable, "-c", "import time; time.sleep(60)"], {str(tmp_path / "c.log")!r},
                           parent_death=signal.SIGTERM)
    pathlib.Path({str(pid_file)!r}).write_text(str(g.pid))
    time.sleep(60)  # a spawning thread that ends takes its children's parent-death signal with it

{start}
time.sleep(60)
"""
    parent = ProcessGroup.spawn([sys.executable, "-c", program], tmp_path / "p.log", cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    assert child.is_running()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(5)
    child.wait(5)  # psutil.TimeoutExpired if it outlived its parent; init reaps it
    assert not child.is_running()


def test_unmapped_multiprocessing_segments_made_since_a_fork_are_found(tmp_path: Path) -> None:
    """Of the entries made since the snapshot: an unmapped multiprocessing semaphore over a second old is stray;
    one this process maps, a fresh one, another kind of name and one from before the snapshot are not."""
    import mmap

    from checkpoint_engine.vllm_process import SHM, _unmapped_since

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    older = SHM / f"sem.mp-old-{tag}"
    older.write_bytes(b"\0" * 32)
    before = set(os.listdir(SHM))
    stray, held, fresh, other = (SHM / f"{kind}-{tag}" for kind in ("sem.mp-stray", "psm_held", "psm_fresh", "x"))
    try:
        for path in (stray, held, other):
            path.write_bytes(b"\0" * 32)
            os.utime(path, (time.time() - 5, time.time() - 5))
        os.utime(older, (time.time() - 5, time.time() - 5))
        fresh.write_bytes(b"\0" * 32)
        with held.open("r+b") as f, mmap.mmap(f.fileno(), 32):
            assert _unmapped_since(before) >= {str(stray)}
            assert not _unmapped_since(before) & {str(held), str(fresh), str(other), str(older)}
    finally:
        for path in (older, stray, held, fresh, other):
            path.unlink(missing_ok=True)
