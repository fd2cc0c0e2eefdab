"""A private, single-member etcd server for one job (the launcher's; clients use `checkpoint_engine.etcd_client`).

Consumes: the `etcd` binary (Debian package `etcd-server`, 3.4) and a directory owned by the job.
Produces: a running server listening on 127.0.0.1 only, its endpoint "127.0.0.1:PORT", a log at
`<dir>/etcd.log` and its data under `<dir>/etcd-data` (a later server started on the same
directory finds the keys again). Waits on: the server answering a read, up to `start_timeout`.

The launcher starts one of these when no etcd endpoint is configured; every other process only
ever sees the endpoint string and calls `connect`. `EtcdWatchdog` starts it again, on the same data
directory and ports, when it dies while its job runs.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import signal
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from checkpoint_engine.contracts.polling import poll_until
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.process_group import ProcessGroup

log = logging.getLogger(__name__)

DEBIAN_BINARY = "/usr/bin/etcd"
LOOPBACK = "127.0.0.1"
PORTS_FROM = 20000  # services' ports are picked from here to the start of the ephemeral range
MEMBER_NAME = "timeshare"
LOG_TAIL_LINES = 40
# A second server racing us for a port found free is the only start failure worth retrying.
_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


def find_etcd_binary() -> str:
    """The etcd binary on PATH, else Debian's path; missing is a setup error, not a job error."""
    found = shutil.which("etcd")
    if found is not None:
        return found
    if Path(DEBIAN_BINARY).is_file():
        return DEBIAN_BINARY
    raise FileNotFoundError(
        f"etcd binary not found on PATH or at {DEBIAN_BINARY}: install the Debian package `etcd-server` "
        "(`make setup` does it), or pass an etcd endpoint so that no local server is needed"
    )


def free_loopback_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 now, picked at random below the kernel's ephemeral range: a port from
    that range can be taken, before its server binds it, as the local end of any outgoing connection (a vLLM
    bound its port 20 s after the pick and found it so). Another process may still bind one first.

    The sockets stay bound until all are picked, so no port is picked twice.
    """
    low, _ = _ephemeral_range()
    candidates = random.Random().sample(range(PORTS_FROM, low), low - PORTS_FROM) if low > PORTS_FROM + count else []
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in [*candidates, *[0] * count]:  # the kernel's choice only if the range below is all taken
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            ports.append(sock.getsockname()[1])
            if len(ports) == count:
                return ports
        raise OSError(f"no {count} free ports on {LOOPBACK}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def etcd_command(binary: str, data_dir: Path, client_port: int, peer_port: int, host: str = LOOPBACK) -> list[str]:
    """The argv of a one-member cluster bound to loopback, and to `host` too where that is another address
    (the head of a job with several nodes); pure, so it is testable without etcd."""
    client_url = f"http://{host}:{client_port}"
    listen = client_url if host == LOOPBACK else f"http://{LOOPBACK}:{client_port},{client_url}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    return [
        binary,
        f"--name={MEMBER_NAME}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={listen}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={MEMBER_NAME}={peer_url}",
        "--initial-cluster-state=new",
        # 3.4 defaults to the deprecated capnslog logger and says so on every start.
        "--logger=zap",
        "--log-outputs=stderr",
    ]


def _read_tail(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class LocalEtcd:
    """One etcd process for one job: `with LocalEtcd(run_dir / "etcd") as etcd: connect(etcd.endpoint)`.

    Leaving the block, normally or by an exception, stops the process: SIGTERM, then SIGKILL after
    `stop_grace` seconds; nothing is left running. The server runs in its own session, so Ctrl-C in the
    launcher's terminal does not kill it under the launcher, which still needs it while it stops the rest.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        binary: str | None = None,
        start_timeout: float = 30.0,
        stop_grace: float = 10.0,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host  # where other nodes reach it, besides loopback
        self.port = port  # its client port; 0: a free one
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.log_path = self.data_dir / "etcd.log"
        self._group: ProcessGroup | None = None
        self._endpoint: str | None = None
        self._peer_port = 0  # kept with the client port once started, so that a restart serves the same endpoint
        self.restarts = 0  # by restart_if_exited

    def __repr__(self) -> str:
        state = f"running at {self._endpoint}, pid {self.pid}" if self.running else "stopped"
        return f"LocalEtcd({str(self.data_dir)!r}, {state})"

    @property
    def endpoint(self) -> str:
        """The running server's address, "HOST:PORT" (loopback unless a host was given); what every other
        process is given."""
        if self._endpoint is None or not self.running:
            raise RuntimeError(f"{self!r} has no endpoint: it is not running")
        return self._endpoint

    @property
    def pid(self) -> int | None:
        """Pid of the last process started (kept after stop, so callers can check it is gone)."""
        return None if self._group is None else self._group.pid

    @property
    def running(self) -> bool:
        return self._group is not None and self._group.alive()

    @property
    def exit_code(self) -> int | None:
        """The last process's exit status, once it has exited."""
        return None if self._group is None else self._group.poll()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd and return once it answers a read; on any failure the process is stopped."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        binary = self.binary or find_etcd_binary()
        if not Path(binary).is_file():
            raise FileNotFoundError(
                f"etcd binary {binary!r} does not exist: install the Debian package `etcd-server` (`make setup`)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start_once(binary)
                return
            except _PortTakenError:
                if attempt == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise

    def restart_if_exited(self) -> bool:
        """Start etcd again on its data directory and ports if it has exited since it started; True if it did. The
        keys come back and clients reconnect to the same endpoint; a failed start raises RuntimeError with the
        cause. The new etcd dies with the thread that calls this (`ProcessGroup.spawn`)."""
        if self._group is None or self.running:
            return False
        code = self.exit_code
        log.warning("etcd (pid %s) exited with status %s; starting it again on %s", self.pid, code, self.data_dir)
        self.stop()  # reaps what is left of it
        try:
            self.start()
        except Exception as e:  # its cause is in the message, with the log's tail
            raise RuntimeError(f"etcd exited with status {code} and did not start again: {e}") from None
        self.restarts += 1
        log.warning("etcd answers again at %s (restart %d)", self.endpoint, self.restarts)
        return True

    def _start_once(self, binary: str) -> None:
        client_port, peer_port = free_loopback_ports(2)
        client_port, peer_port = self.port or client_port, self._peer_port or peer_port
        # The log is appended to, so that an earlier server's on the same directory survives a restart.
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        # etcd itself creates the data directory with mode 0700 (it warns on anything looser).
        command = etcd_command(binary, self.data_dir / "etcd-data", client_port, peer_port, self.host)
        self._group = ProcessGroup.spawn(command, self.log_path, parent_death=signal.SIGTERM)  # dies with its job
        self._endpoint = f"{self.host}:{client_port}"
        try:
            self._wait_ready(self._group, self._endpoint, log_start)
        except RuntimeError as exc:
            self.stop()
            if _PORT_TAKEN in str(exc):
                raise _PortTakenError(str(exc)) from exc
            raise
        self.port, self._peer_port = client_port, peer_port

    def _wait_ready(self, proc: ProcessGroup, endpoint: str, log_start: int) -> None:
        """Poll until a linearizable read succeeds, i.e. the member has elected itself leader."""
        with connect(endpoint, timeout=1.0) as client:

            def answers() -> bool | None:
                code = proc.poll()
                if code is not None:
                    raise RuntimeError(
                        f"etcd exited with code {code} before answering on {endpoint}; "
                        f"last lines of {self.log_path}:\n{_read_tail(self.log_path, log_start)}"
                    )
                try:
                    client.get("/")
                    return True
                except Exception:  # pyetcd's own errors and grpc's while etcd is coming up
                    return None

            if poll_until(answers, self.start_timeout, every=0.05) is None:
                raise RuntimeError(
                    f"etcd (pid {proc.pid}) did not answer on {endpoint} within {self.start_timeout:g} s; "
                    f"last lines of {self.log_path}:\n{_read_tail(self.log_path, log_start)}"
                )

    def stop(self) -> None:
        """SIGTERM, wait `stop_grace` s, then SIGKILL; idempotent."""
        self._endpoint = None
        if self._group is not None:
            self._group.stop(self.stop_grace)


class EtcdWatchdog:
    """While its `with` block runs, a thread starts `etcd` again (`restart_if_exited`) within `interval` s of its
    exit, whatever the job's main thread is blocked on; `failure` says why, once a start failed."""

    def __init__(self, etcd: LocalEtcd, interval: float = 0.2) -> None:
        self.etcd, self.interval = etcd, interval
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="etcd-watchdog", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.etcd.restart_if_exited()
            except RuntimeError as e:
                self.failure = str(e)
                log.error("%s", e)
                return


class _PortTakenError(RuntimeError):
    """Another process bound a port between our probe and etcd's bind."""
