"""Model-written programs run under bubblewrap (`bwrap`, Debian's `bubblewrap`): what the code task executes.

Consumes a Python program and its standard input; produces a `RunResult` (how it ended, its capped
output). Each run is one `bwrap` process tree with
- new PID, network, IPC, UTS and cgroup namespaces: no network but a loopback that is down, and
  every process of the program dies with it (the PID namespace's init is bwrap's);
- a root of its own: the system's /usr and /lib and the interpreter's prefix read-only, a fresh
  /dev, /proc and /tmp, and an empty scratch directory as its working directory; nothing of the
  host's other files (the run directory, the checkpoints) exists in it;
- an unprivileged uid (as root, setpriv drops to a uid of the slot's own, so RLIMIT_NPROC bounds a
  fork bomb without counting anyone else's processes), no capabilities, no new privileges;
- rlimits on address space (a 10 GB allocation is a MemoryError), CPU seconds, processes, file size;
- a wall-clock limit (the whole tree is killed) and a cap on the output read.
bubblewrap rather than hand-written namespaces because it is small, audited and packaged (Flatpak's
sandbox); nsjail is not packaged in Debian 12, firejail is a setuid tool aimed at desktop programs.
Run by a user other than root, bwrap makes a user namespace and the program keeps that user's uid;
RLIMIT_NPROC is then left alone (it would count all of the user's processes), so a fork bomb is
bounded by the wall clock and the PID namespace only. The tests run as root.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import Field

from checkpoint_engine.contracts.config import ConfigError, Section

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]
FIRST_UID = 61000  # the slots' uids as root: 61000, 61001, ... (no account needs to exist for them)


class SandboxConfig(Section):
    """The `task.sandbox` section: the limits of each program run of the code task."""

    KEY = "task.sandbox"
    seconds: float = Field(5.0, gt=0)  # wall clock per run (the CPU limit is its ceiling in seconds)
    memory_mb: int = Field(512, ge=64)  # address space (RLIMIT_AS)
    processes: int = Field(16, ge=1)  # processes and threads of the uid (RLIMIT_NPROC)
    output_kib: int = Field(64, ge=1)  # stdout read per run; more is the `output_limit` outcome
    file_kib: int = Field(1024, ge=0)  # largest file it may write in its scratch directory


@dataclass(frozen=True)
class RunResult:
    status: Status
    stdout: str
    stderr: str  # its last KiB, for the reason
    seconds: float


def bwrap_path() -> str:
    """The bwrap executable, or a ConfigError saying how to get it."""
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(
            "task.name='code' runs programs under bubblewrap and `bwrap` is not on PATH: install the Debian "
            "package bubblewrap (`make setup` does)"
        )
    return path


class Sandbox:
    """Runs programs under `cfg`'s limits; thread-safe, each concurrent run in a slot (a uid) of its own."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self._bwrap = bwrap_path()
        self._root = os.geteuid() == 0
        self._free: list[int] = []
        self._slots = 0
        self._lock = threading.Lock()
        probe = self.run("print(6 * 7)")
        if probe.status != "ok" or probe.stdout.strip() != "42":
            raise ConfigError(f"the sandbox cannot run a program here ({probe.status}): {probe.stderr.strip()[-500:]}")

    def run(self, program: str, stdin: str = "") -> RunResult:
        uid = self._take_slot()
        try:
            with tempfile.TemporaryDirectory(prefix="timeshare-sandbox-") as scratch:
                Path(scratch, "main.py").write_text(program, encoding="utf-8")
                if self._root:  # the program's to write; bwrap (root without capabilities) may still enter it
                    os.chown(scratch, uid, uid)
                    os.chmod(scratch, 0o755)
                return self._run(Path(scratch), uid, stdin)
        finally:
            with self._lock:
                self._free.append(uid)

    def _take_slot(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._slots += 1
            return FIRST_UID + self._slots - 1

    def _command(self, scratch: Path, uid: int) -> list[str]:
        prefix = sys.base_prefix  # the interpreter (a venv's python links to it) and its standard library
        cmd = [self._bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not self._root:
            cmd.append("--unshare-user")  # unprivileged bwrap needs a user namespace for its mounts
        cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if self._root:  # only what setpriv needs to drop to the slot's uid (which clears every capability)
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        cmd += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/lib", "/lib", "--ro-bind-try", "/lib64", "/lib64"]
        cmd += ["--symlink", "usr/bin", "/bin"]
        for parent in reversed(Path(prefix).parents[:-1]):  # e.g. /root of a pyenv: enterable for the uid
            cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", prefix, prefix]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(scratch), "/sandbox"]
        cmd += ["--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/sandbox"]
        cmd.append("--")
        if self._root:  # drop root inside the sandbox: the uid's own RLIMIT_NPROC count applies
            ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
            cmd += ["/usr/bin/setpriv", *ids, "--inh-caps=-all"]
        cmd += [str(Path(sys.base_prefix, "bin", "python3")), "-I", "main.py"]
        return cmd

    def _limits(self) -> None:
        """Runs in the child before bwrap starts; every process of the program inherits these."""
        cfg = self.cfg
        memory = cfg.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = int(cfg.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg.file_kib * 1024, cfg.file_kib * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self._root:  # as another user the count is of this user's processes, which are not the program's
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg.processes, cfg.processes))

    def _run(self, scratch: Path, uid: int, stdin: str) -> RunResult:
        cap = self.cfg.output_kib * 1024
        start = time.perf_counter()
        proc = subprocess.Popen(
            self._command(scratch, uid),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=self._limits,  # noqa: PLW1509 (no threads touch the child between fork and exec)
            start_new_session=True,
        )
        out = bytearray()
        err = bytearray()
        pipes = [
            threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True),
            threading.Thread(target=_read_capped, args=(proc.stdout, out, cap + 1), daemon=True),
            threading.Thread(target=_read_capped, args=(proc.stderr, err, 1 << 16), daemon=True),
        ]
        for t in pipes:
            t.start()
        status: Status | None = None
        deadline = start + self.cfg.seconds
        while proc.poll() is None:
            if time.perf_counter() > deadline:
                status = "timeout"
                break
            if len(out) > cap:
                status = "output_limit"
                break
            time.sleep(0.005)
        _kill(proc)
        for t in pipes:
            t.join(timeout=1.0)
        seconds = time.perf_counter() - start
        stderr = err[-1024:].decode("utf-8", "replace")
        if status is None:
            status = _status(proc.returncode, stderr, len(out) > cap)
        return RunResult(status, bytes(out[:cap]).decode("utf-8", "replace"), stderr, seconds)


def _status(returncode: int, stderr: str, over_cap: bool) -> Status:
    if over_cap:
        return "output_limit"
    if returncode == 0:
        return "ok"
    if "MemoryError" in stderr:
        return "memory"
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return "timeout"  # the CPU limit's signal (bwrap reports a child's death by signal as 128 + n)
    return "error"


def _read_capped(stream: BinaryIO, into: bytearray, cap: int) -> None:
    """Read `stream` to its end, keeping the first `cap` bytes (the rest is drained, not held)."""
    while chunk := stream.read1(65536):
        if len(into) < cap:
            into += chunk[: cap - len(into)]
    stream.close()


def _feed(stream: BinaryIO, text: str) -> None:
    """Write the input and close it (in a thread: a program that never reads must not block the clock);
    a program that exits without reading it is not an error here."""
    try:
        stream.write(text.encode("utf-8"))
        stream.close()
    except OSError:
        pass


def _kill(proc: subprocess.Popen) -> None:
    """The whole tree: bwrap's session (the PID namespace's processes die with its init)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
