"""One node's view of the job in etcd: leader election (`leadership`), the phase, acks, the shard registry.

Consumes: an etcd endpoint (or a client from `etcd_client.connect`), the job name and this node's
id; the key layout and records of `etcd_keys`, the phase rules of `contracts.phases`.
Produces: this node's registration (`node_lease`), the leader key on that lease, phase changes
(leader only: a compare-and-swap on the phase's revision, fenced by the leader key's revision, that
also prunes what finished iterations left behind, see `Coordinator.advance`), acks and shard records.
Waits on: etcd watches, all through `etcd_watch.watch_until`, for the phase, acks, shards, node
registration and expiry and a vacant leader key; every wait takes a timeout and its error
(`coordination_errors`) names who or what did not arrive. etcd out of reach surfaces as pyetcd's
ConnectionFailedError once `etcd_outage` seconds of trying again have passed (the heartbeat retries on
its own). etcd carries coordination only; bulk data goes through shm / Mooncake (see
`contracts/weight_region.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from checkpoint_engine.contracts.phases import Phase, PhaseState, check_transition
from checkpoint_engine.contracts.polling import Deadline, poll_until
from checkpoint_engine.coordination_errors import (
    CoordinationError,
    CoordinationTimeout,
    NodeFailedError,
    NodeLostError,
    PhaseFailedError,
    StaleStateError,
)
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.etcd_keys import (
    Ack,
    Keys,
    NodeStatus,
    ShardRecord,
    check_name,
    decode,
    describe,
    encode,
    last_segment,
    names,
    retained,
)
from checkpoint_engine.etcd_watch import Event, watch_until
from checkpoint_engine.leadership import Leadership
from checkpoint_engine.node_lease import NodeLease

if TYPE_CHECKING:
    import pyetcd

logger = logging.getLogger(__name__)

DEFAULT_TTL = 10  # seconds; etcd 3.4 grants at least ~2 s whatever is asked for
ERROR_CHARS = 500  # of an error ack's message: etcd carries coordination, not logs
T = TypeVar("T")


def _as_predicate(until: PhaseState | Callable[[PhaseState], bool]) -> tuple[Callable[[PhaseState], bool], str]:
    if isinstance(until, PhaseState):
        target = (until.iteration, until.phase, until.weight_version)
        return (lambda s: (s.iteration, s.phase, s.weight_version) == target), describe(until)
    return until, getattr(until, "__name__", repr(until))


class _NodeLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['node']}] {msg}", kwargs


# ----------------------------------------------------------------------------------- coordinator
class Coordinator:
    """One node's view of the job in etcd: registration, election, phase, acks, shard registry.

    `Coordinator(endpoint_or_client, job, node)` registers the node on a fresh lease and starts the
    heartbeat; `close()` (or leaving the `with` block) stops it and revokes the lease, which drops
    the node record and the leadership at once. A client passed in stays open; one built from an
    endpoint is closed with the coordinator.
    """

    def __init__(
        self,
        etcd: str | pyetcd.MultiEndpointEtcd3Client,
        job: str,
        node: str,
        *,
        ttl: int = DEFAULT_TTL,
        http_address: str = "",
        vllm_address: str = "",
        etcd_outage: float = 0.0,
        node_grace: float = 0.0,
    ) -> None:
        self.keys = Keys(job)
        self.node_grace = node_grace  # how long a barrier waits for a node without a live lease to return
        # When each node a barrier waits for was first seen without a live lease; kept across barrier calls, so that
        # a barrier waited for in slices (the phase loop's) still ends once `node_grace` has passed.
        self._lost_since: dict[str, float] = {}
        self.node = check_name(node, "node id")
        self.log = _NodeLog(logger, {"node": node})
        self._owns_client = isinstance(etcd, str)
        self.client = connect(etcd, outage=etcd_outage) if isinstance(etcd, str) else etcd
        self._closed = False
        # the lease it takes the leader key on is the node's current one (a fresh one after an expiry)
        self.leadership = Leadership(self.client, self.keys, node, lambda: self._node.lease, self.log)
        addresses = {"http_address": http_address, "vllm_address": vllm_address}
        status = NodeStatus(node=node, pid=os.getpid(), host=socket.gethostname(), started_at=time.time(), **addresses)
        try:
            self._node = NodeLease(
                self.client, self.keys.node(node), status, ttl=ttl, log=self.log, on_expired=self.leadership.lost
            )
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise
        self.status, self.ttl, self.heartbeat = status, self._node.ttl, self._node.heartbeat

    def __repr__(self) -> str:
        return f"Coordinator(job={self.keys.job!r}, node={self.node!r}, ttl={self.ttl})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the heartbeat and revoke the lease (node record and leadership go at once); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.leadership.lost()
        self._node.close()
        if self._owns_client:
            self.client.close()

    def stop_riding_out(self) -> None:
        """Fail etcd requests at once, waiting ones included, if etcd is out of reach: this node is stopping."""
        give_up = getattr(self.client, "give_up", None)  # a client made with `etcd_outage`
        if give_up is not None:
            give_up()

    @property
    def lease_id(self) -> int:
        return self._node.lease.id

    # --------------------------------------------------------------------------------- election
    def campaign(self, timeout: float = 0.0) -> bool:
        """Take the leader key if it is vacant; with a timeout, wait (watching the key) for a vacancy.

        True when this node holds the key (also when it already did). The key lives on this node's
        lease, so it goes when the node closes, crashes or hangs past its TTL.
        """
        won = self._wait_until([self.keys.leader], self.leadership.try_lead, timeout)
        if not won:
            self.log.info("not elected: %s leads", self.leader())
        return bool(won)

    def leader(self) -> str | None:
        """The node holding the leader key, or None while the seat is vacant."""
        return self.leadership.leader()

    def is_leader(self) -> bool:
        return self.leadership.held()

    def seat(self) -> tuple[str | None, bool]:
        """Who leads and whether it is this node, from one read."""
        return self.leadership.seat()

    # ------------------------------------------------------------------------------------ phase
    def read_phase(self) -> tuple[PhaseState | None, int]:
        """The current phase and its mod revision; (None, 0) before the leader initialised it."""
        value, meta = self.client.get(self.keys.phase)
        return (None, 0) if value is None else (decode(PhaseState, value), meta.mod_revision)

    def init_phase(self, state: PhaseState) -> tuple[PhaseState, int]:
        """Write `state` if the job has no phase yet (leader only); returns what etcd then holds.

        A job that already has a phase (a restarted leader, a second leader after a failover) keeps
        it: the existing state and its revision come back, and `state` is ignored.
        """
        txn, key = self.client.transactions, self.keys.phase
        fence = self.leadership.fence()
        created, responses = self.client.transaction(
            compare=[txn.create(key) == 0, txn.mod(self.keys.leader) == fence],
            success=[txn.put(key, encode(state)), txn.get(key)],
            failure=[txn.get(key), txn.get(self.keys.leader)],
        )
        if not created:
            self.leadership.check_fence(fence, responses[1])
        value, meta = responses[1 if created else 0][0]
        found = decode(PhaseState, value)
        self.log.info(
            "%s phase %s at revision %d", "initialised" if created else "found", describe(found), meta.mod_revision
        )
        return found, meta.mod_revision

    def advance(self, expected: PhaseState | int, new: PhaseState) -> int:
        """Move the phase from `expected` (a state read before, or its revision) to `new`; leader only.

        Validates with `check_transition` first (IllegalTransition names both states). The write is
        a compare-and-swap on the phase's mod revision and on this node's leader key revision: a
        lost race raises StaleStateError, a lost leadership NotLeaderError. Returns the new revision.

        The same transaction prunes what finished iterations left behind, so that the job's keys do
        not grow with every iteration (`etcd_keys.retained`): it keeps the acks of `new`'s iteration
        and the one before (the controller reads iteration i's acks for its phase timings while the
        job is in iteration i + 1) and the shard records of `new`'s weight version and the one before
        (the version served and the one being exported or loaded). Being part of the fenced write, a
        deposed leader prunes nothing.
        """
        fence = self.leadership.fence()
        current, revision = self.read_phase()
        if current is None:
            raise CoordinationError(f"{self.node} cannot advance to {describe(new)}: the phase was never initialised")
        expected_revision = expected if isinstance(expected, int) else revision
        if (expected != current) if isinstance(expected, PhaseState) else (expected != revision):
            raise StaleStateError(expected, revision, current)
        check_transition(current, new)
        txn, key = self.client.transactions, self.keys.phase
        keep = retained(new)
        acks_start, acks_end = self.keys.acks_before(keep.first_iteration)
        shards_start, shards_end = self.keys.shards_before(keep.first_version)
        swapped, responses = self.client.transaction(
            compare=[txn.mod(key) == expected_revision, txn.mod(self.keys.leader) == fence],
            success=[
                txn.put(key, encode(new)),
                txn.get(key),
                txn.delete(acks_start, range_end=acks_end),
                txn.delete(shards_start, range_end=shards_end),
            ],
            failure=[txn.get(key), txn.get(self.keys.leader)],
        )
        if not swapped:
            self.leadership.check_fence(fence, responses[1])
            value, meta = responses[0][0] if responses[0] else (None, None)
            found = None if value is None else decode(PhaseState, value)
            raise StaleStateError(expected_revision, 0 if meta is None else meta.mod_revision, found)
        new_revision = responses[1][0][1].mod_revision
        self.log.info("phase %s -> %s (revision %d -> %d)", describe(current), describe(new), revision, new_revision)
        acks, shards = (r.response_delete_range.deleted for r in responses[2:])
        if acks or shards:
            self.log.info(
                "pruned %d acks before iteration %d and %d shard records before version %d",
                acks,
                keep.first_iteration,
                shards,
                keep.first_version,
            )
        return new_revision

    def wait_phase(
        self, until: PhaseState | Callable[[PhaseState], bool], timeout: float, *, raise_on_failed: bool = True
    ) -> PhaseState:
        """The first phase state (current one included) that matches `until`, seen through a watch.

        `until` is a target state (iteration, phase and weight version must match) or a predicate.
        Every state written while waiting is seen in order, none skipped. A FAILED state that does
        not match raises PhaseFailedError unless `raise_on_failed` is False.
        """
        matches, wanted = _as_predicate(until)
        last_seen: list[PhaseState | None] = [None]

        def judge(state: PhaseState | None) -> PhaseState | None:
            last_seen[0] = state
            if state is not None and matches(state):
                return state
            if state is not None and raise_on_failed and state.phase is Phase.FAILED:
                raise PhaseFailedError(state, wanted)
            return None

        def read() -> tuple[PhaseState | None, int]:
            response = self.client.get_response(self.keys.phase)
            state = decode(PhaseState, response.kvs[0].value) if response.count else None
            return judge(state), response.header.revision

        def handle(events: list[Event]) -> PhaseState | None:
            for event in events:
                if (found := judge(decode(PhaseState, event.value) if event.value else None)) is not None:
                    return found
            return None

        found = watch_until(self.client, [self.keys.phase], read, handle, timeout=timeout, log=self.log)
        if found is None:
            raise CoordinationTimeout(
                f"{self.node} waited {timeout:g} s for phase {wanted}; last seen: {describe(last_seen[0])}"
            )
        return found

    # ------------------------------------------------------------------------------------ nodes
    def alive_nodes(self) -> dict[str, NodeStatus]:
        """Nodes whose lease is live, by node id."""
        return {
            last_segment(meta.key): decode(NodeStatus, value) for value, meta in self.client.get_prefix(self.keys.nodes)
        }

    def missing_nodes(self, expected: Iterable[str]) -> list[str]:
        """Those of `expected` without a live lease, sorted."""
        return sorted(set(expected) - set(self.alive_nodes()))

    def wait_nodes(self, nodes: Iterable[str], timeout: float) -> dict[str, NodeStatus]:
        """Wait until every one of `nodes` is registered (the start-up barrier); returns their status."""
        wanted = set(nodes)

        def all_there() -> dict[str, NodeStatus] | None:
            alive = self.alive_nodes()
            return {n: alive[n] for n in wanted} if wanted <= set(alive) else None

        found = self._wait_until([self.keys.nodes], all_there, timeout)
        if found is None:
            raise CoordinationTimeout(
                f"{self.node} waited {timeout:g} s for nodes to register; missing: {names(self.missing_nodes(wanted))}"
            )
        return found

    # ------------------------------------------------------------------------------------- acks
    def ack(self, state: PhaseState, payload: Mapping[str, Any] | None = None, error: str = "") -> None:
        """Record that this node finished `state` (iteration and phase); `payload` is small JSON. With
        an `error`, that it could not: the leader's barrier then fails the phase without waiting."""
        done = {"iteration": state.iteration, "phase": state.phase, "payload": dict(payload or {})}
        record = Ack(node=self.node, acked_at=time.time(), error=error[:ERROR_CHARS], **done)
        self.client.put(self.keys.ack(state.iteration, state.phase, self.node), encode(record))
        self.log.info("%s %s", f"could not do ({error})" if error else "acked", describe(state))

    def acks(self, state: PhaseState) -> dict[str, Ack]:
        """The acks recorded so far for `state`'s iteration and phase, by node id."""
        prefix = self.keys.acks(state.iteration, state.phase)
        return {last_segment(meta.key): decode(Ack, value) for value, meta in self.client.get_prefix(prefix)}

    def iteration_acks(self, iteration: int) -> dict[Phase, dict[str, Ack]]:
        """Every ack recorded for `iteration`, by phase and node (what phase timings are read from)."""
        found: dict[Phase, dict[str, Ack]] = {}
        for value, _ in self.client.get_prefix(self.keys.iteration_acks(iteration)):
            ack = decode(Ack, value)
            found.setdefault(ack.phase, {})[ack.node] = ack
        return found

    def wait_acks(self, state: PhaseState, nodes: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Barrier: every one of `nodes` acked `state`; returns their payloads by node id.

        Raises CoordinationTimeout naming the silent nodes, or NodeLostError at once when one of
        them lost its lease without acking (no point waiting out the timeout for a dead node).
        """
        prefix, what = (
            self.keys.acks(state.iteration, state.phase),
            f"{state.phase.value} (iteration {state.iteration})",
        )

        def read() -> dict[str, Ack]:
            found = self.acks(state)
            failed = {n: a.error for n, a in found.items() if a.error}
            if failed:
                raise NodeFailedError(f"{what} failed on " + "; ".join(f"{n}: {e}" for n, e in sorted(failed.items())))
            return found

        records = self._barrier(prefix, set(nodes), read, timeout, f"acks of {what}")
        return {n: records[n].payload for n in sorted(records)}

    def errors(self, iteration: int) -> list[str]:
        """What the nodes reported they could not do in `iteration` (error acks), as lines."""
        acks = (a for by in self.iteration_acks(iteration).values() for a in by.values())
        return [f"{a.node} in {a.phase.value}: {a.error}" for a in acks if a.error]

    # ----------------------------------------------------------------------------------- shards
    def register_shards(self, version: int, manifest: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        """Publish where this node's weights of `version` live (`manifest`: `Manifest.to_dict()`)."""
        if "version" in manifest and manifest["version"] != version:
            raise ValueError(f"{self.node}: manifest of version {manifest['version']} registered as version {version}")
        where = {"manifest": dict(manifest), "transport": dict(transport)}
        record = ShardRecord(node=self.node, version=version, registered_at=time.time(), **where)
        self.client.put(self.keys.shard(version, self.node), encode(record))
        self.log.info("registered the shards of weight version %d", version)

    def shards(self, version: int) -> dict[str, ShardRecord]:
        """The shard records of `version` registered so far, by node id."""
        prefix = self.keys.shards(version)
        return {last_segment(meta.key): decode(ShardRecord, value) for value, meta in self.client.get_prefix(prefix)}

    def wait_shards(self, version: int, nodes: Iterable[str], timeout: float) -> dict[str, ShardRecord]:
        """Barrier: every one of `nodes` registered `version`; errors as for `wait_acks`."""
        prefix = self.keys.shards(version)
        return self._barrier(prefix, set(nodes), lambda: self.shards(version), timeout, f"shards of version {version}")

    # ------------------------------------------------------------------------------------ waits
    def _barrier(
        self, prefix: str, nodes: set[str], read: Callable[[], dict[str, T]], timeout: float, what: str
    ) -> dict[str, T]:
        """Wait for a record from each of `nodes`. A silent node without a live lease (crashed, or stalled past its
        TTL) is waited for `node_grace` s to register again, counted from the first barrier that found it so;
        NodeLostError names it after that."""
        lost_since = self._lost_since

        def check() -> dict[str, T] | None:
            found = read()
            silent = nodes - set(found)
            if not silent:
                return {n: found[n] for n in nodes}
            now, missing = time.monotonic(), set(self.missing_nodes(silent))
            for node in sorted(lost_since.keys() - missing):
                self.log.warning("node %s has a live lease again after %.1f s", node, now - lost_since.pop(node))
            for node in sorted(missing - lost_since.keys()):
                lost_since[node] = now
                if self.node_grace:
                    self.log.warning(
                        "node %s has no live lease; waiting up to %g s (phase.node_grace) for it to return and send %s",
                        node,
                        self.node_grace,
                        what,
                    )
            gone = sorted(n for n, since in lost_since.items() if now - since >= self.node_grace)
            if gone:
                waited = f"return within {self.node_grace:g} s (phase.node_grace) to " if self.node_grace else ""
                raise NodeLostError(
                    f"{self.node}: node(s) {names(gone)} have no live lease (crashed, hung or never registered) "
                    f"and did not {waited}send {what}"
                )
            return None

        deadline = Deadline(timeout)

        def one_wait() -> dict[str, T] | None:
            # wakes (no event may come) when a lost node's grace ends, and every half grace to see one
            ends = [since + self.node_grace - time.monotonic() for since in lost_since.values()]
            every = [self.node_grace / 2] if self.node_grace else []
            return self._wait_until([prefix, self.keys.nodes], check, max(0.05, min([deadline.left(), *ends, *every])))

        done = poll_until(one_wait, timeout, every=0.0)
        if done is None:
            silent = nodes - set(read())
            raise CoordinationTimeout(
                f"{self.node} waited {timeout:g} s for {what}; no answer from {names(silent)} "
                f"(answered: {names(nodes - silent)})"
            )
        return done

    def _wait_until(self, keys: list[str], check: Callable[[], T | None], timeout: float) -> T | None:
        """Re-evaluate `check` (fresh reads) whenever something under `keys` changes; its first
        non-None result, or None at the timeout."""

        def read() -> tuple[T | None, int]:
            # The revision comes first: every change after it reaches the watch, whatever `check` read.
            revision = self.client.get_response(keys[0], count_only=True).header.revision
            return check(), revision

        return watch_until(self.client, keys, read, lambda _events: check(), timeout=timeout, log=self.log)
