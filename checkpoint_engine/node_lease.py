"""This node's registration in etcd: its record on a lease, kept alive by a heartbeat thread.

Consumes: a pyetcd client, the node's key and NodeStatus (`etcd_keys`), the TTL asked for.
Produces: `nodes/{node}` on a lease that a heartbeat refreshes every ttl/3; the current lease, for
keys that must go with the node (the leader key). When the lease ran out anyway (a stall or etcd
out of reach for a whole TTL), it re-registers on a fresh lease, loudly, and tells its owner through
`on_expired`, since whatever the old lease held (the leadership) is gone.
Waits on: nothing but the heartbeat's timer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from checkpoint_engine.etcd_keys import NodeStatus, decode, encode
from checkpoint_engine.etcd_watch import brief

if TYPE_CHECKING:
    import pyetcd


class Heartbeat:
    """Calls `beat` every `interval` seconds on a daemon thread until stopped.

    `stop()` without revoking the lease is what a hung or killed process looks like to the other
    nodes: the lease runs out within its TTL. A failed beat is logged and retried on the next tick.
    """

    def __init__(self, beat: Callable[[], None], interval: float, log: logging.LoggerAdapter) -> None:
        self._beat, self.interval, self._log = beat, interval, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="coordination-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception as exc:  # etcd unreachable for a moment: the next tick tries again
                self._log.warning("heartbeat failed (%s); retrying in %.2f s", brief(exc), self.interval)


class NodeLease:
    """`key` -> `status` on a lease of `ttl` seconds, refreshed until `close()` revokes it.

    `on_expired()` runs after a re-registration (the new lease already current) and returns
    whether this node was the leader, for the log line.
    """

    def __init__(
        self,
        client: pyetcd.MultiEndpointEtcd3Client,
        key: str,
        status: NodeStatus,
        *,
        ttl: int,
        log: logging.LoggerAdapter,
        on_expired: Callable[[], bool],
    ) -> None:
        self.client, self.key, self.status, self.log, self._on_expired = client, key, status, log, on_expired
        self._lock = threading.Lock()
        self._lease = self._grant(ttl)
        self.ttl = int(self._lease.ttl)
        self._register()
        self.heartbeat = Heartbeat(self._beat, self.ttl / 3, log)
        self.heartbeat.start()

    @property
    def lease(self) -> Any:
        """The lease this node's keys live on now (a new one after an expiry)."""
        with self._lock:
            return self._lease

    def close(self) -> None:
        """Stop the heartbeat and revoke the lease: every key on it goes at once."""
        self.heartbeat.stop()
        lease = self.lease
        try:
            lease.revoke()
            self.log.info("left the job: lease %x revoked", lease.id)
        except Exception as exc:  # etcd gone: the lease runs out by itself within the TTL
            self.log.warning("could not revoke lease %x (%s); it expires within %d s", lease.id, brief(exc), self.ttl)

    def _grant(self, ttl: int) -> Any:
        lease = self.client.lease(ttl)
        if lease.ttl != ttl:
            self.log.info("asked for a %d s lease, etcd granted %d s", ttl, lease.ttl)
        return lease

    def _register(self) -> None:
        lease = self.lease
        response = self.client.put(self.key, encode(self.status), lease=lease, prev_kv=True)
        if response.HasField("prev_kv") and response.prev_kv.lease != lease.id:
            previous = decode(NodeStatus, response.prev_kv.value)
            self.log.warning(
                "replaced a live record of %s (pid %d on %s, started %.0f s ago): a restart of this node, or two "
                "daemons with one node id",
                self.status.node,
                previous.pid,
                previous.host,
                time.time() - previous.started_at,
            )
        self.log.info(
            "registered as %s (pid %d) on lease %x, ttl %d s", self.status.node, self.status.pid, lease.id, lease.ttl
        )

    def _beat(self) -> None:
        lease = self.lease
        responses = lease.refresh()
        if responses and responses[0].TTL > 0:
            return
        # The lease ran out (the process stalled, or etcd was out of reach, for a whole TTL): the
        # other nodes have already seen this node fail. Say so loudly and come back.
        new_lease = self._grant(self.ttl)
        with self._lock:
            self._lease = new_lease
        was_leader = self._on_expired()
        self.log.error(
            "LEASE EXPIRED: lease %x ran out (no keep-alive reached etcd within %d s); the other nodes saw this node "
            "fail. Re-registering on lease %x%s",
            lease.id,
            self.ttl,
            new_lease.id,
            "; LEADERSHIP IS LOST" if was_leader else "",
        )
        self._register()
