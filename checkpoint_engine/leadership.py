"""The leader key of a job and the fencing token it gives: who may write the phase.

The key lives on the node's lease, so it goes when the node closes, crashes or hangs past its
TTL. Its mod revision, remembered when this node took it, is the fencing token every phase write
compares against: a deposed leader's write fails instead of overwriting its successor's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from checkpoint_engine.coordination_errors import NotLeaderError
from checkpoint_engine.etcd_client import lease_not_found
from checkpoint_engine.etcd_keys import Keys, LeaderRecord, decode, encode

if TYPE_CHECKING:
    import logging

    import pyetcd


class Leadership:
    def __init__(
        self,
        client: pyetcd.MultiEndpointEtcd3Client,
        keys: Keys,
        node: str,
        lease: Callable[[], pyetcd.Lease],
        log: logging.LoggerAdapter,
    ) -> None:
        self.client, self.keys, self.node, self.lease, self.log = client, keys, node, lease, log
        self._lock = threading.Lock()
        self._revision: int | None = None  # mod revision of our leader key: the fencing token

    def try_lead(self) -> bool | None:
        """Take the leader key if it is vacant: True when this node holds it (also when it already did),
        None while another node (or an earlier run of this one, on another lease) does."""
        txn, key = self.client.transactions, self.keys.leader
        lease = self.lease()
        record = encode(LeaderRecord(node=self.node, elected_at=time.time()))
        try:
            _, responses = self.client.transaction(
                compare=[txn.create(key) == 0],
                success=[txn.put(key, record, lease=lease), txn.get(key)],
                failure=[txn.get(key)],
            )
        except Exception as exc:
            if not lease_not_found(exc):
                raise
            # The node's lease went (revoked, or expired unnoticed): the heartbeat re-registers it on its next
            # beat, and this node may campaign again then; meanwhile another node may take the seat.
            self.log.warning("cannot campaign: lease %x is gone; the next heartbeat registers a new one", lease.id)
            return None
        kvs = responses[-1]
        if not kvs:  # the key vanished between the compare and the read: try again on the next event
            return None
        value, meta = kvs[0]
        # Our node id on another lease is an earlier run of this node: wait until that lease runs out.
        if decode(LeaderRecord, value).node != self.node or meta.lease_id != lease.id:
            return None
        with self._lock:
            # The node lease swaps its lease before `lost` takes this lock, so either the check below
            # sees the new lease or `lost` clears what is set here.
            if self.lease() is not lease:  # re-registered meanwhile: the key went with the old lease
                return None
            newly, self._revision = self._revision != meta.mod_revision, meta.mod_revision
        if newly:
            self.log.info("elected leader of job %s (leader key revision %d)", self.keys.job, meta.mod_revision)
        return True

    def seat(self) -> tuple[str | None, bool]:
        """The node holding the leader key (None while the seat is vacant) and whether it is this node's, from
        one read of etcd, not from memory: a lease that expired took the leadership with it."""
        value, meta = self.client.get(self.keys.leader)
        if value is None:
            return None, False
        with self._lock:
            mine = meta.mod_revision == self._revision and meta.lease_id == self.lease().id
        return decode(LeaderRecord, value).node, mine

    def leader(self) -> str | None:
        return self.seat()[0]

    def held(self) -> bool:
        return self.seat()[1]

    def lost(self) -> bool:
        """Forget the leadership (the lease it lived on is gone); whether this node had it."""
        with self._lock:
            was_leader, self._revision = self._revision is not None, None
        return was_leader

    def fence(self) -> int:
        """The fencing token for a phase write; NotLeaderError when this node does not lead."""
        with self._lock:
            revision = self._revision
        if revision is None:
            raise NotLeaderError(f"{self.node} may not write the phase: it is not the leader ({self.leader()} is)")
        return revision

    def check_fence(self, fence: int, leader_kvs: list) -> None:
        """After a fenced write failed: NotLeaderError if the leader key (as the transaction read it) is no
        longer the one `fence` came from; the leadership is then forgotten."""
        if leader_kvs and leader_kvs[0][1].mod_revision == fence:
            return
        with self._lock:
            if self._revision == fence:
                self._revision = None
        holder = decode(LeaderRecord, leader_kvs[0][0]).node if leader_kvs else "no node"
        raise NotLeaderError(f"{self.node} lost the leadership (its lease expired); now {holder} leads")
