"""cluster=local2: the second node of a job on this machine, behind a network interface of its own.

The head creates a network namespace for node1 and a veth pair between it and its own: the head's end
has 10.231.X.1, node1's 10.231.X.2, so etcd, the trainer ranks' rendezvous, the engines' APIs, the vLLMs
and Mooncake talk between two addresses as on two hosts, and node1's processes see only their own
loopback. It needs root (CAP_NET_ADMIN) and iproute2; without them both nodes use 127.0.0.1. The
namespace is deleted on exit; one left by a launcher killed with SIGKILL is deleted by the next start.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import psutil

log = logging.getLogger("timeshare.local_nodes")
NAMESPACE_PREFIX = "timeshare-"  # + the head's pid
SUBNET = "10.231"


@dataclass(frozen=True)
class Placement:
    """Where a node of this machine lives: its address, the interface its trainer ranks use, and the
    argv prefix that runs a command there."""

    address: str
    interface: str
    prefix: tuple[str, ...] = ()


LOOPBACK = Placement(address="127.0.0.1", interface="lo")


class LocalNetwork:
    """`with LocalNetwork() as net:` net.head and net.node are the two nodes' placements."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.namespace = f"{NAMESPACE_PREFIX}{pid}"
        self._veth = (f"tsh{pid % 10**8}", f"tsn{pid % 10**8}")  # at most 15 characters
        self.head, self.node = LOOPBACK, LOOPBACK
        self._made = False

    def __enter__(self) -> Self:
        _remove_orphaned_namespaces()
        try:
            self._create()
        except (OSError, subprocess.CalledProcessError) as e:
            self._delete()
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
            log.warning("no network namespace for node1 (%s); both nodes use 127.0.0.1", detail)
            self.head, self.node = LOOPBACK, LOOPBACK
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._delete()

    def _create(self) -> None:
        subnet = _free_subnet()
        head_if, node_if = self._veth
        _ip("netns", "add", self.namespace)
        self._made = True
        _ip("link", "add", head_if, "type", "veth", "peer", "name", node_if)
        _ip("link", "set", node_if, "netns", self.namespace)
        _ip("addr", "add", f"{subnet}.1/24", "dev", head_if)
        _ip("link", "set", head_if, "up")
        inside = ("ip", "netns", "exec", self.namespace)
        for args in (
            ("addr", "add", f"{subnet}.2/24", "dev", node_if),
            ("link", "set", node_if, "up"),
            ("link", "set", "lo", "up"),
        ):
            _run([*inside, "ip", *args])
        self.head = Placement(address=f"{subnet}.1", interface=head_if)
        self.node = Placement(address=f"{subnet}.2", interface=node_if, prefix=inside)
        log.info(
            "node1 in network namespace %s at %s; the head at %s", self.namespace, self.node.address, subnet + ".1"
        )

    def _delete(self) -> None:
        if self._made:  # the veth pair goes with the namespace that holds one end
            subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, check=False)
            self._made = False


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, text=True, check=True)


def _free_subnet() -> str:
    """A 10.231.X subnet no interface of this machine has an address in."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    for x in [(os.getpid() % 250) + 1, *range(1, 255)]:
        if f" {SUBNET}.{x}." not in used:
            return f"{SUBNET}.{x}"
    raise OSError(f"every {SUBNET}.X/24 subnet is taken")


def _remove_orphaned_namespaces() -> None:
    """Namespaces of launchers that no longer run (killed by SIGKILL before they could delete them)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name.removeprefix(NAMESPACE_PREFIX)
        if name.startswith(NAMESPACE_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            log.warning("removed network namespace %s of a launcher that no longer runs", name)
