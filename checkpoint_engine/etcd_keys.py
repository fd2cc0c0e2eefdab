"""The job's key layout in etcd and the records stored there: pure, no client.

Consumes: a job name, node ids, iterations, weight versions and phase states. Produces key strings under
`/timeshare/{job}/` and the JSON bytes of each record:

- `phase`                            PhaseState (`contracts.phases`); written only by the leader;
- `leader`                           LeaderRecord, on the leader's lease;
- `nodes/{node}`                     NodeStatus, on the node's lease;
- `acks/{iteration}/{phase}/{node}`  Ack with a small JSON payload (timings, version loaded, ...);
- `weights/{version}/{node}`         ShardRecord: the node's manifest and how to reach its buffer.

Iterations and versions are zero-padded (`acks/00000003/TRAIN/node0`), so that key order is numeric
order and pruning everything before an iteration is one range delete. Ack keys carry the iteration
and phase, so no key is ever reused across iterations. `retained` says which of them a job keeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from checkpoint_engine.contracts.phases import Phase, PhaseState

SCHEMA = 1
KEY_ROOT = "/timeshare"
COUNTER_WIDTH = 8
MAX_COUNTER = 10**COUNTER_WIDTH - 1
# etcd refuses requests over 1.5 MiB; a record near that size is bulk data that belongs in shm.
MAX_VALUE_BYTES = 1 << 20
T = TypeVar("T")


def check_name(name: str, what: str) -> str:
    """A job or node id becomes a key segment: non-empty, printable, no '/', no outer spaces."""
    if not name or "/" in name or not name.isprintable() or name != name.strip():
        raise ValueError(f"bad {what} {name!r}: use a non-empty printable name without '/' or outer spaces")
    return name


ATTEMPT_MARK = "@"  # between a job's name and its attempt's in the name an attempt coordinates under


def attempt_namespace(job: str, attempt: str) -> str:
    """The job name that one attempt of `job` coordinates under (`job@attempt`)."""
    return f"{check_name(job, 'job')}{ATTEMPT_MARK}{check_name(attempt, 'attempt')}"


def attempts_of(job: str, namespaces: Iterable[str]) -> list[str]:
    """Those of `namespaces` (job names in etcd) that belong to `job`: its own name and its attempts'."""
    return sorted(n for n in set(namespaces) if n == job or n.startswith(job + ATTEMPT_MARK))


def counter(value: int, what: str) -> str:
    """An iteration or version as a key segment, zero-padded so that key order is numeric order."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{what} must be an int in 0..{MAX_COUNTER}, got {value!r}")
    return f"{value:0{COUNTER_WIDTH}d}"


def last_segment(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Retained:
    """The oldest iteration whose acks and the oldest version whose shard records a job keeps."""

    first_iteration: int
    first_version: int


def retained(state: PhaseState) -> Retained:
    """What the job must keep once it is at `state`; everything older may be pruned.

    Acks: the current iteration and the previous one. The controller reads the acks of iteration i
    (its phase timings) after ONLOAD of i, while the job is already in iteration i + 1.
    Shard records: the version the state carries and the one before it, i.e. the version vLLM
    serves (or last served) and the one being exported or loaded; a restarted node resolves its
    weights from them.
    """
    return Retained(first_iteration=max(state.iteration - 1, 0), first_version=max(state.weight_version - 1, 0))


@dataclass(frozen=True)
class Keys:
    """Every key of one job; pure, so the layout is tested without etcd. Prefixes end with '/'."""

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

    def iteration_acks(self, iteration: int) -> str:
        return f"{self.all_acks}{counter(iteration, 'iteration')}/"

    def acks(self, iteration: int, phase: Phase) -> str:
        return f"{self.iteration_acks(iteration)}{Phase(phase).value}/"

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


# ---------------------------------------------------------------------------------------- records
def _check_schema(kind: str, d: Mapping[str, Any]) -> None:
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{kind} record schema {d.get('schema')!r} is not understood (expected {SCHEMA})")


@dataclass(frozen=True)
class NodeStatus:
    """What `nodes/{node}` holds while the node's lease lives."""

    node: str
    pid: int
    host: str
    http_address: str  # the engine's API
    started_at: float
    vllm_address: str = ""  # the node's vLLM sidecar (http://HOST:PORT), which the controller spreads rollouts over
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeStatus:
        _check_schema("node status", d)
        return cls(
            node=d["node"],
            pid=d["pid"],
            host=d["host"],
            http_address=d["http_address"],
            started_at=d["started_at"],
            vllm_address=d.get("vllm_address", ""),
        )


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
    """One node's answer to one phase of one iteration; `payload` is small JSON (timings, ...). An
    `error` says the node could not do its part: the leader fails the phase at once, naming it."""

    node: str
    iteration: int
    phase: Phase
    payload: dict[str, Any]
    acked_at: float
    error: str = ""
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phase": self.phase.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        _check_schema("ack", d)
        return cls(
            node=d["node"],
            iteration=d["iteration"],
            phase=Phase(d["phase"]),
            payload=dict(d["payload"]),
            acked_at=d["acked_at"],
            error=d.get("error", ""),
        )


@dataclass(frozen=True)
class ShardRecord:
    """Where one node's weights of one version live: its manifest (`Manifest.to_dict()`) and how
    another node reaches them (`transport`: e.g. the Mooncake session and buffer address)."""

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
        return cls(
            node=d["node"],
            version=d["version"],
            manifest=dict(d["manifest"]),
            transport=dict(d["transport"]),
            registered_at=d["registered_at"],
        )


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


def names(nodes: Iterable[str]) -> str:
    """Node ids for a message: sorted, comma-separated."""
    return ", ".join(sorted(nodes)) or "(none)"
