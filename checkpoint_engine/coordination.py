"""The etcd side of the phase machine: thin over the pure rules in `phases.py`.

Consumes: an etcd endpoint (or a client from `checkpoint_engine.etcd_client.connect`), the job name and this
node's id. Produces, under `/timeshare/{job}/`:

- `phase`                          PhaseState JSON; written only by the leader, by compare-and-swap
                                   on its mod revision, fenced by the leader key's revision;
- `leader`                         LeaderRecord on the leader's lease (a lease-backed lock);
- `nodes/{node}`                   NodeStatus on this node's lease, kept alive by a heartbeat thread;
- `acks/{iteration}/{phase}/{node}`  Ack with a small JSON payload (timings, version loaded, ...);
- `weights/{version}/{node}`       ShardRecord: the node's manifest and how to reach its buffer.

Iterations and versions are zero-padded in keys (`acks/00000003/TRAIN/node0`), so that key order is
numeric order and pruning everything before an iteration is one range delete. Ack keys carry the
iteration and phase, so no key is ever reused across iterations.

Waits on: etcd watches (never busy polling) for the phase, acks, shards, node expiry and a vacant
leader key; every wait takes a timeout and its error names who or what did not arrive. etcd out of
reach surfaces as pyetcd's ConnectionFailedError (the heartbeat alone retries, every ttl/3).
etcd carries coordination only; bulk data goes through shm / Mooncake (see `shm_buffer.py`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from checkpoint_engine.contracts.phases import Phase, PhaseState, check_transition
from checkpoint_engine.etcd_client import connect

if TYPE_CHECKING:
    import pyetcd

logger = logging.getLogger(__name__)

SCHEMA = 1
KEY_ROOT = "/timeshare"
DEFAULT_TTL = 10  # seconds; etcd 3.4 grants at least ~2 s whatever is asked for
COUNTER_WIDTH = 8
MAX_COUNTER = 10**COUNTER_WIDTH - 1
# etcd refuses requests over 1.5 MiB; a record near that size is bulk data that belongs in shm.
MAX_VALUE_BYTES = 1 << 20
_REWATCH_PAUSE = 0.2  # seconds between attempts to re-open a watch whose stream broke
T = TypeVar("T")


# ---------------------------------------------------------------------------------------- errors
class CoordinationError(RuntimeError):
    """A coordination step that cannot go on (as opposed to a timeout)."""


class CoordinationTimeout(CoordinationError, TimeoutError):
    """A wait ran out; the message names what did not arrive (nodes, iteration, phase, version)."""


class StaleStateError(CoordinationError):
    """A compare-and-swap on the phase lost: someone else wrote it since the caller read it."""

    def __init__(self, expected: int | PhaseState, found_revision: int, found: PhaseState | None) -> None:
        self.expected, self.found_revision, self.found = expected, found_revision, found
        self.expected_revision = expected if isinstance(expected, int) else None
        wanted = f"revision {expected}" if isinstance(expected, int) else describe(expected)
        super().__init__(
            f"phase compare-and-swap lost: expected {wanted}, found revision {found_revision} holding {describe(found)}"
        )


class NotLeaderError(CoordinationError):
    """A phase write from a node that does not (or no longer) hold the leader key."""


class NodeLostError(CoordinationError):
    """A node awaited by a barrier lost its lease (crashed, hung or cut off) before answering."""


class PhaseFailedError(CoordinationError):
    """The leader declared the phase FAILED while this node waited for something else."""

    def __init__(self, state: PhaseState, waited_for: str) -> None:
        self.state = state
        super().__init__(f"the job is {describe(state)} (while waiting for {waited_for})")


# -------------------------------------------------------------------------------------- pure keys
def check_name(name: str, what: str) -> str:
    """A job or node id becomes a key segment: non-empty, printable, no '/', no outer spaces."""
    if not name or "/" in name or not name.isprintable() or name != name.strip():
        raise ValueError(f"bad {what} {name!r}: use a non-empty printable name without '/' or outer spaces")
    return name


def counter(value: int, what: str) -> str:
    """An iteration or version as a key segment, zero-padded so that key order is numeric order."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{what} must be an int in 0..{MAX_COUNTER}, got {value!r}")
    return f"{value:0{COUNTER_WIDTH}d}"


def last_segment(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Keys:
    """Every key of one job; pure, so the layout is tested without etcd."""

    job: str

    def __post_init__(self) -> None:
        check_name(self.job, "job")

    @property
    def root(self) -> str:
        return f"{KEY_ROOT}/{self.job}/"

    @property
    def phase(self) -> str:
        return self.root + "phase"

    @property
    def leader(self) -> str:
        return self.root + "leader"

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    def node(self, node: str) -> str:
        return self.nodes + check_name(node, "node id")

    @property
    def all_acks(self) -> str:
        return self.root + "acks/"

    def acks(self, iteration: int, phase: Phase) -> str:
        return f"{self.all_acks}{counter(iteration, 'iteration')}/{Phase(phase).value}/"

    def ack(self, iteration: int, phase: Phase, node: str) -> str:
        return self.acks(iteration, phase) + check_name(node, "node id")

    def acks_before(self, iteration: int) -> tuple[str, str]:
        """[start, end) holding the acks of every iteration < `iteration`."""
        return self.all_acks, self.all_acks + counter(iteration, "iteration")

    @property
    def all_shards(self) -> str:
        return self.root + "weights/"

    def shards(self, version: int) -> str:
        return f"{self.all_shards}{counter(version, 'weight version')}/"

    def shard(self, version: int, node: str) -> str:
        return self.shards(version) + check_name(node, "node id")

    def shards_before(self, version: int) -> tuple[str, str]:
        """[start, end) holding the shard records of every version < `version`."""
        return self.all_shards, self.all_shards + counter(version, "weight version")


# ---------------------------------------------------------------------------------------- messages
def _check_schema(kind: str, d: Mapping[str, Any]) -> None:
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{kind} record schema {d.get('schema')!r} is not understood (expected {SCHEMA})")


@dataclass(frozen=True)
class NodeStatus:
    """What `nodes/{node}` holds while the node's lease lives."""

    node: str
    pid: int
    host: str
    http_address: str
    started_at: float
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeStatus:
        _check_schema("node status", d)
        return cls(node=d["node"], pid=d["pid"], host=d["host"], http_address=d["http_address"],
                   started_at=d["started_at"])  # fmt: skip


@dataclass(frozen=True)
class LeaderRecord:
    """What `leader` holds, on the leader's own lease."""

    node: str
    elected_at: float
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LeaderRecord:
        _check_schema("leader", d)
        return cls(node=d["node"], elected_at=d["elected_at"])


@dataclass(frozen=True)
class Ack:
    """One node's answer to one phase of one iteration; `payload` is small JSON (timings, ...)."""

    node: str
    iteration: int
    phase: Phase
    payload: dict[str, Any]
    acked_at: float
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phase": self.phase.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        _check_schema("ack", d)
        return cls(node=d["node"], iteration=d["iteration"], phase=Phase(d["phase"]), payload=dict(d["payload"]),
                   acked_at=d["acked_at"])  # fmt: skip


@dataclass(frozen=True)
class ShardRecord:
    """Where one node's weights of one version live: its manifest (`shm_buffer.Manifest.to_dict()`)
    and how another node reaches them (`transport`: e.g. the Mooncake session and buffer address)."""

    node: str
    version: int
    manifest: dict[str, Any]
    transport: dict[str, Any]
    registered_at: float
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardRecord:
        _check_schema("shard", d)
        return cls(node=d["node"], version=d["version"], manifest=dict(d["manifest"]), transport=dict(d["transport"]),
                   registered_at=d["registered_at"])  # fmt: skip


def encode(record: Any) -> bytes:
    """JSON of `record.to_dict()`; refuses what is too big for a coordination store."""
    data = json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(
            f"{type(record).__name__} is {len(data)} bytes, over the {MAX_VALUE_BYTES}-byte limit for an etcd value: "
            "etcd carries coordination only; put bulk data in the weight buffer"
        )
    return data


def decode(cls: type[T], data: bytes) -> T:
    return cls.from_dict(json.loads(data))  # type: ignore[attr-defined]


def describe(state: PhaseState | None) -> str:
    if state is None:
        return "no phase"
    return f"{state.phase.value} (iteration {state.iteration}, weight version {state.weight_version})"


def _as_predicate(until: PhaseState | Callable[[PhaseState], bool]) -> tuple[Callable[[PhaseState], bool], str]:
    if isinstance(until, PhaseState):
        target = (until.iteration, until.phase, until.weight_version)
        return (lambda s: (s.iteration, s.phase, s.weight_version) == target), describe(until)
    return until, getattr(until, "__name__", repr(until))


def _brief(exc: BaseException) -> str:
    """One line for an error; gRPC's own repr spans several."""
    details = getattr(exc, "details", None)
    return f"{type(exc).__name__}: {details() if callable(details) else exc}"


def _names(nodes: Iterable[str]) -> str:
    return ", ".join(sorted(nodes)) or "(none)"


# ------------------------------------------------------------------------------------- heartbeat
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
                self._log.warning("heartbeat failed (%s); retrying in %.2f s", _brief(exc), self.interval)


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
    ) -> None:
        self.keys = Keys(job)
        self.node = check_name(node, "node id")
        self.log = _NodeLog(logger, {"node": node})
        self._owns_client = isinstance(etcd, str)
        self.client = connect(etcd) if isinstance(etcd, str) else etcd
        self.status = NodeStatus(node=node, pid=os.getpid(), host=socket.gethostname(), http_address=http_address,
                                 started_at=time.time())  # fmt: skip
        self._lock = threading.Lock()
        self._leader_revision: int | None = None  # mod revision of our leader key: the fencing token
        self._closed = False
        try:
            self._lease = self._grant(ttl)
            self.ttl = int(self._lease.ttl)
            self._register()
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise
        self.heartbeat = Heartbeat(self._beat, self.ttl / 3, self.log)
        self.heartbeat.start()

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
        self.heartbeat.stop()
        with self._lock:
            lease, self._leader_revision = self._lease, None
        try:
            lease.revoke()
            self.log.info("left the job: lease %x revoked", lease.id)
        except Exception as exc:  # etcd gone: the lease runs out by itself within the TTL
            self.log.warning("could not revoke lease %x (%s); it expires within %d s", lease.id, _brief(exc), self.ttl)
        if self._owns_client:
            self.client.close()

    # ------------------------------------------------------------------------------------ lease
    def _grant(self, ttl: int) -> Any:
        lease = self.client.lease(ttl)
        if lease.ttl != ttl:
            self.log.info("asked for a %d s lease, etcd granted %d s", ttl, lease.ttl)
        return lease

    def _register(self) -> None:
        response = self.client.put(self.keys.node(self.node), encode(self.status), lease=self._lease, prev_kv=True)
        if response.HasField("prev_kv") and response.prev_kv.lease != self._lease.id:
            previous = decode(NodeStatus, response.prev_kv.value)
            self.log.warning(
                "replaced a live record of %s (pid %d on %s, started %.0f s ago): a restart of this node, or two "
                "daemons with one node id",
                self.node, previous.pid, previous.host, time.time() - previous.started_at,
            )  # fmt: skip
        self.log.info("registered as %s (pid %d) on lease %x, ttl %d s", self.node, self.status.pid, self._lease.id,
                      self._lease.ttl)  # fmt: skip

    def _beat(self) -> None:
        with self._lock:
            lease = self._lease
        responses = lease.refresh()
        if responses and responses[0].TTL > 0:
            return
        # The lease ran out (the process stalled, or etcd was out of reach, for a whole TTL): the
        # other nodes have already seen this node fail. Say so loudly and come back.
        new_lease = self._grant(self.ttl)
        with self._lock:
            self._lease = new_lease
            was_leader, self._leader_revision = self._leader_revision is not None, None
        self.log.error(
            "LEASE EXPIRED: lease %x ran out (no keep-alive reached etcd within %d s); the other nodes saw this node "
            "fail. Re-registering on lease %x%s",
            lease.id, self.ttl, new_lease.id, "; LEADERSHIP IS LOST" if was_leader else "",
        )  # fmt: skip
        self._register()

    @property
    def lease_id(self) -> int:
        with self._lock:
            return self._lease.id

    # --------------------------------------------------------------------------------- election
    def campaign(self, timeout: float = 0.0) -> bool:
        """Take the leader key if it is vacant; with a timeout, wait (watching the key) for a vacancy.

        True when this node holds the key (also when it already did). The key lives on this node's
        lease, so it goes when the node closes, crashes or hangs past its TTL.
        """
        won = self._wait_until([self.keys.leader], self._try_lead, timeout)
        if not won:
            self.log.info("not elected: %s leads", self.leader())
        return bool(won)

    def _try_lead(self) -> bool | None:
        txn, key = self.client.transactions, self.keys.leader
        with self._lock:
            lease = self._lease
        record = encode(LeaderRecord(node=self.node, elected_at=time.time()))
        _, responses = self.client.transaction(
            compare=[txn.create(key) == 0], success=[txn.put(key, record, lease=lease), txn.get(key)],
            failure=[txn.get(key)],
        )  # fmt: skip
        kvs = responses[-1]
        if not kvs:  # the key vanished between the compare and the read: try again on the next event
            return None
        value, meta = kvs[0]
        # Our node id on another lease is an earlier run of this node: wait until that lease runs out.
        if decode(LeaderRecord, value).node != self.node or meta.lease_id != lease.id:
            return None
        with self._lock:
            if self._lease is not lease:  # re-registered meanwhile: the key went with the old lease
                return None
            newly, self._leader_revision = self._leader_revision != meta.mod_revision, meta.mod_revision
        if newly:
            self.log.info("elected leader of job %s (leader key revision %d)", self.keys.job, meta.mod_revision)
        return True

    def leader(self) -> str | None:
        """The node holding the leader key, or None while the seat is vacant."""
        value, _ = self.client.get(self.keys.leader)
        return None if value is None else decode(LeaderRecord, value).node

    def is_leader(self) -> bool:
        """Read from etcd, not from memory: a lease that expired took the leadership with it."""
        value, meta = self.client.get(self.keys.leader)
        with self._lock:
            return value is not None and meta.mod_revision == self._leader_revision and meta.lease_id == self._lease.id

    def resign(self) -> None:
        """Give the leader key up (only if it is still ours) without leaving the job."""
        txn = self.client.transactions
        with self._lock:
            revision, self._leader_revision = self._leader_revision, None
        if revision is not None:
            self.client.transaction(compare=[txn.mod(self.keys.leader) == revision],
                                    success=[txn.delete(self.keys.leader)], failure=[])  # fmt: skip
            self.log.info("resigned the leadership")

    # ------------------------------------------------------------------------------------ phase
    def read_phase(self) -> tuple[PhaseState | None, int]:
        """The current phase and its mod revision; (None, 0) before the leader initialised it."""
        value, meta = self.client.get(self.keys.phase)
        return (None, 0) if value is None else (decode(PhaseState, value), meta.mod_revision)

    def _fence(self) -> int:
        with self._lock:
            revision = self._leader_revision
        if revision is None:
            raise NotLeaderError(f"{self.node} may not write the phase: it is not the leader ({self.leader()} is)")
        return revision

    def init_phase(self, state: PhaseState) -> tuple[PhaseState, int]:
        """Write `state` if the job has no phase yet (leader only); returns what etcd then holds.

        A job that already has a phase (a restarted leader, a second leader after a failover) keeps
        it: the existing state and its revision come back, and `state` is ignored.
        """
        txn, key = self.client.transactions, self.keys.phase
        fence = self._fence()
        created, responses = self.client.transaction(
            compare=[txn.create(key) == 0, txn.mod(self.keys.leader) == fence],
            success=[txn.put(key, encode(state)), txn.get(key)], failure=[txn.get(key), txn.get(self.keys.leader)],
        )  # fmt: skip
        if not created:
            self._raise_if_not_leader(fence, responses[1])
        value, meta = responses[1 if created else 0][0]
        found = decode(PhaseState, value)
        self.log.info("%s phase %s at revision %d", "initialised" if created else "found", describe(found),
                      meta.mod_revision)  # fmt: skip
        return found, meta.mod_revision

    def advance(self, expected: PhaseState | int, new: PhaseState) -> int:
        """Move the phase from `expected` (a state read before, or its revision) to `new`; leader only.

        Validates with `check_transition` first (IllegalTransition names both states). The write is
        a compare-and-swap on the phase's mod revision and on this node's leader key revision: a
        lost race raises StaleStateError, a lost leadership NotLeaderError. Returns the new revision.
        """
        fence = self._fence()
        current, revision = self.read_phase()
        if current is None:
            raise CoordinationError(f"{self.node} cannot advance to {describe(new)}: the phase was never initialised")
        expected_revision = expected if isinstance(expected, int) else revision
        if (expected != current) if isinstance(expected, PhaseState) else (expected != revision):
            raise StaleStateError(expected, revision, current)
        check_transition(current, new)
        txn, key = self.client.transactions, self.keys.phase
        swapped, responses = self.client.transaction(
            compare=[txn.mod(key) == expected_revision, txn.mod(self.keys.leader) == fence],
            success=[txn.put(key, encode(new)), txn.get(key)], failure=[txn.get(key), txn.get(self.keys.leader)],
        )  # fmt: skip
        if not swapped:
            self._raise_if_not_leader(fence, responses[1])
            value, meta = responses[0][0] if responses[0] else (None, None)
            found = None if value is None else decode(PhaseState, value)
            raise StaleStateError(expected_revision, 0 if meta is None else meta.mod_revision, found)
        new_revision = responses[1][0][1].mod_revision
        self.log.info("phase %s -> %s (revision %d -> %d)", describe(current), describe(new), revision, new_revision)
        return new_revision

    def _raise_if_not_leader(self, fence: int, leader_kvs: list) -> None:
        if leader_kvs and leader_kvs[0][1].mod_revision == fence:
            return
        with self._lock:
            if self._leader_revision == fence:
                self._leader_revision = None
        holder = decode(LeaderRecord, leader_kvs[0][0]).node if leader_kvs else "no node"
        raise NotLeaderError(f"{self.node} lost the leadership (its lease expired or it resigned); now {holder} leads")

    def wait_phase(
        self, until: PhaseState | Callable[[PhaseState], bool], timeout: float, *, raise_on_failed: bool = True
    ) -> PhaseState:
        """The first phase state (current one included) that matches `until`, seen through a watch.

        `until` is a target state (iteration, phase and weight version must match) or a predicate.
        Every state written while waiting is seen in order, none skipped. A FAILED state that does
        not match raises PhaseFailedError unless `raise_on_failed` is False.
        """
        matches, wanted = _as_predicate(until)
        deadline = time.monotonic() + timeout
        response = self.client.get_response(self.keys.phase)
        state = decode(PhaseState, response.kvs[0].value) if response.count else None
        events: queue.Queue[Any] = queue.Queue()
        next_revision = response.header.revision + 1
        watch_id = self._watch(self.keys.phase, events, start_revision=next_revision, prefix=False)
        try:
            while True:
                if state is not None and matches(state):
                    return state
                if state is not None and raise_on_failed and state.phase is Phase.FAILED:
                    raise PhaseFailedError(state, wanted)
                item = self._next_event(events, deadline)
                if item is None:
                    raise CoordinationTimeout(
                        f"{self.node} waited {timeout:g} s for phase {wanted}; last seen: {describe(state)}"
                    )
                if not hasattr(item, "events"):  # the watch stream broke: resume where it stopped
                    self.log.warning("phase watch broke (%r); re-watching from revision %d", item, next_revision)
                    self.client.cancel_watch(watch_id)
                    watch_id = self._watch(self.keys.phase, events, start_revision=next_revision, prefix=False)
                    continue
                for event in item.events:
                    next_revision = event.mod_revision + 1
                    state = decode(PhaseState, event.value) if event.value else None
                    if state is not None and (matches(state) or (raise_on_failed and state.phase is Phase.FAILED)):
                        break
        finally:
            self.client.cancel_watch(watch_id)

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
                f"{self.node} waited {timeout:g} s for nodes to register; missing: {_names(self.missing_nodes(wanted))}"
            )
        return found

    def wait_node_gone(self, node: str, timeout: float) -> None:
        """Return once `node`'s record is gone (its lease revoked or expired: at most its TTL after it died)."""
        key = self.keys.node(node)

        def gone() -> bool | None:
            return True if self.client.get(key)[0] is None else None

        if self._wait_until([key], gone, timeout) is None:
            raise CoordinationTimeout(f"{self.node} waited {timeout:g} s for node {node} to go; it is still alive")

    # ------------------------------------------------------------------------------------- acks
    def ack(self, state: PhaseState, payload: Mapping[str, Any] | None = None) -> None:
        """Record that this node finished `state` (iteration and phase); `payload` is small JSON."""
        record = Ack(node=self.node, iteration=state.iteration, phase=state.phase, payload=dict(payload or {}),
                     acked_at=time.time())  # fmt: skip
        self.client.put(self.keys.ack(state.iteration, state.phase, self.node), encode(record))
        self.log.info("acked %s", describe(state))

    def acks(self, state: PhaseState) -> dict[str, Ack]:
        """The acks recorded so far for `state`'s iteration and phase, by node id."""
        prefix = self.keys.acks(state.iteration, state.phase)
        return {last_segment(meta.key): decode(Ack, value) for value, meta in self.client.get_prefix(prefix)}

    def iteration_acks(self, iteration: int) -> dict[Phase, dict[str, Ack]]:
        """Every ack recorded for `iteration`, by phase and node (what phase timings are read from)."""
        found: dict[Phase, dict[str, Ack]] = {}
        prefix = self.keys.all_acks + counter(iteration, "iteration") + "/"
        for value, _ in self.client.get_prefix(prefix):
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
        records = self._barrier(prefix, set(nodes), lambda: self.acks(state), timeout, f"acks of {what}")
        return {n: records[n].payload for n in sorted(records)}

    def _barrier(
        self, prefix: str, nodes: set[str], read: Callable[[], dict[str, T]], timeout: float, what: str
    ) -> dict[str, T]:
        def check() -> dict[str, T] | None:
            found = read()
            silent = nodes - set(found)
            if not silent:
                return {n: found[n] for n in nodes}
            lost = sorted(silent & set(self.missing_nodes(silent)))
            if lost:
                raise NodeLostError(
                    f"{self.node}: node(s) {_names(lost)} have no live lease (crashed, hung or never registered) "
                    f"and did not send {what}"
                )
            return None

        done = self._wait_until([prefix, self.keys.nodes], check, timeout)
        if done is None:
            silent = nodes - set(read())
            raise CoordinationTimeout(
                f"{self.node} waited {timeout:g} s for {what}; no answer from {_names(silent)} "
                f"(answered: {_names(nodes - silent)})"
            )
        return done

    def prune(self, before_iteration: int) -> int:
        """Delete the acks of every iteration before `before_iteration`; returns how many went."""
        return self._delete_range(*self.keys.acks_before(before_iteration), f"acks before iteration {before_iteration}")

    # ----------------------------------------------------------------------------------- shards
    def register_shards(self, version: int, manifest: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        """Publish where this node's weights of `version` live (`manifest`: `Manifest.to_dict()`)."""
        if "version" in manifest and manifest["version"] != version:
            raise ValueError(f"{self.node}: manifest of version {manifest['version']} registered as version {version}")
        record = ShardRecord(node=self.node, version=version, manifest=dict(manifest), transport=dict(transport),
                             registered_at=time.time())  # fmt: skip
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

    def prune_shards(self, before_version: int) -> int:
        """Delete the shard records of every version before `before_version`; returns how many went."""
        return self._delete_range(*self.keys.shards_before(before_version), f"shards before version {before_version}")

    # ------------------------------------------------------------------------------------ etcd
    def _delete_range(self, start: str, end: str, what: str) -> int:
        txn = self.client.transactions
        _, responses = self.client.transaction(compare=[], success=[txn.delete(start, range_end=end)], failure=[])
        deleted = responses[0].response_delete_range.deleted
        self.log.info("pruned %d %s", deleted, what)
        return deleted

    def _watch(self, key: str, events: queue.Queue[Any], *, start_revision: int | None = None, prefix: bool) -> int:
        kwargs = {} if start_revision is None else {"start_revision": start_revision}
        if prefix:
            return self.client.add_watch_prefix_callback(key, events.put, **kwargs)
        return self.client.add_watch_callback(key, events.put, **kwargs)

    @staticmethod
    def _next_event(events: queue.Queue[Any], deadline: float) -> Any:
        """The next watch response or stream error (pyetcd passes None when a stream just ends), or
        None at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            item = events.get(timeout=remaining)
        except queue.Empty:
            return None
        return item if item is not None else ConnectionError("watch stream ended")

    def _wait_until(self, prefixes: list[str], check: Callable[[], T | None], timeout: float) -> T | None:
        """Re-evaluate `check` (fresh reads) whenever something under `prefixes` changes; its first
        non-None result, or None at the timeout. The watch opens before the first read, so no
        change between the read and the wait is missed."""
        if timeout <= 0:
            return check()
        deadline = time.monotonic() + timeout
        events: queue.Queue[Any] = queue.Queue()
        watch_ids = [self._watch(p, events, prefix=True) for p in prefixes]
        try:
            while True:
                result = check()
                if result is not None:
                    return result
                item = self._next_event(events, deadline)
                if item is None:
                    return None
                broken = not hasattr(item, "events")
                while not events.empty():  # one fresh read answers a burst of events
                    broken = not hasattr(events.get_nowait(), "events") or broken
                if broken:
                    self.log.warning("watch broke (%r); re-watching", item)
                    for watch_id in watch_ids:
                        self.client.cancel_watch(watch_id)
                    time.sleep(_REWATCH_PAUSE)
                    watch_ids = [self._watch(p, events, prefix=True) for p in prefixes]
        finally:
            for watch_id in watch_ids:
                self.client.cancel_watch(watch_id)
