"""`timeshare bench nodes --nodes 8 32 128 256`: the etcd phase machine of N simulated nodes on one real etcd.

Every simulated node is a real `Coordinator` (its own etcd client, lease and heartbeat) running the real
`PhaseLoop` (election, the start-up barrier, acks, the leader's barriers, the fenced advance that prunes
old iterations), with handlers that only ack: no vLLM, no trainer, so what is measured is coordination
alone. The nodes are threads in a few worker processes (`--processes`), as a cluster's nodes would each
be one process. For each N, on a fresh etcd, after `--warmup` iterations, over `--iterations` more:

- `advance_ms` p50 / p99 over the phase changes: from the last ack of a phase being written to every
  node having seen the next phase, split into `barrier_ms` (last ack -> the leader's advance committed)
  and `fanout_ms` (committed -> the last node saw it);
- etcd `requests` (gRPC messages received, by method) and `bytes_in` / `bytes_out` per iteration, from
  etcd's own /metrics; `keys` held under the job's root at ONLOAD (its high point); `watch_streams`
  and `watchers` open; CPU seconds per iteration of etcd and of the simulated nodes;
- `failover`: the leader's lease revoked during a phase; seconds until another node holds the leader
  key and until the phase moves on again.

The numbers include one observer of the bench's own (a watch of the phase, a key count per iteration).
On a machine with few cores the simulated nodes compete for them: `node_cpu_s` says how much of an
iteration's time that was.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from checkpoint_engine.contracts.phases import CYCLE, Owner, Phase, PhaseState, next_state, spec
from checkpoint_engine.coordinator import Coordinator
from checkpoint_engine.etcd_client import connect
from checkpoint_engine.etcd_keys import Keys, LeaderRecord, decode
from checkpoint_engine.phase_loop import Handler, PhaseLoop
from launch.etcd_server import LocalEtcd

JOB = "bench-nodes"
TTL = 10  # seconds, the job's default (`phase.ttl`)
Key = tuple[int, str]  # (iteration, phase)


def _emit(**record: object) -> None:
    print(json.dumps({"bench": "nodes", **record}), flush=True)


def node_ids(count: int) -> list[str]:
    return [f"node{i:03d}" for i in range(count)]


def slices(nodes: Sequence[str], processes: int) -> list[list[str]]:
    """`nodes` dealt round-robin over at most `processes` workers (none left empty)."""
    count = max(1, min(processes, len(nodes)))
    return [list(nodes[i::count]) for i in range(count)]


# ------------------------------------------------------------------------------------- worker side
class _Recorded(Coordinator):
    """A coordinator that notes when its acks and phase advances were written (etcd answered)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acked: dict[Key, float] = {}
        self.advanced: dict[Key, float] = {}

    def ack(self, state: PhaseState, payload: Mapping[str, Any] | None = None, error: str = "") -> None:
        super().ack(state, payload, error)
        self.acked[(state.iteration, state.phase.value)] = time.time()

    def advance(self, expected: PhaseState | int, new: PhaseState) -> int:
        revision = super().advance(expected, new)
        self.advanced[(new.iteration, new.phase.value)] = time.time()
        return revision


@dataclass
class _Acked:
    def to_dict(self) -> dict[str, Any]:
        return {}


@dataclass
class _SimulatedNode:
    """One node: its coordinator, the loop on a thread, and when it first saw each phase."""

    coordinator: _Recorded
    loop: PhaseLoop
    seen: dict[Key, float] = field(default_factory=dict)
    thread: threading.Thread | None = None

    @classmethod
    def join(cls, endpoint: str, node: str, nodes: Sequence[str], node_grace: float) -> _SimulatedNode:
        coordinator = _Recorded(endpoint, JOB, node, ttl=TTL, node_grace=node_grace)
        head = node == nodes[0]  # the node that runs the controller acks the controller's phases

        def handler(phase: Phase) -> Handler | None:
            return None if spec(phase).owner is Owner.CONTROLLER and not head else (lambda state: _Acked())

        loop = PhaseLoop(coordinator, nodes, handler=handler, phase_timeout=120.0)
        simulated = cls(coordinator, loop)
        loop.begin = lambda state: simulated.seen.setdefault((state.iteration, state.phase.value), time.time())
        return simulated

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run, name=f"loop-{self.coordinator.node}", daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.loop.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.coordinator.close()
        c = self.coordinator
        return {"node": c.node, "seen": _listed(self.seen), "acked": _listed(c.acked), "advanced": _listed(c.advanced)}


def _listed(times: Mapping[Key, float]) -> list[tuple[int, str, float]]:
    return [(i, p, t) for (i, p), t in times.items()]


def _worker(
    endpoint: str, mine: list[str], nodes: list[str], node_grace: float, *, go: Any, stop: Any, out: Any
) -> None:
    """A worker process: registers its nodes, runs their loops from `go` to `stop`, sends what they saw."""
    simulated = [_SimulatedNode.join(endpoint, n, nodes, node_grace) for n in mine]
    out.put(("ready", os.getpid()))
    go.wait()
    for node in simulated:
        node.start()
    stop.wait()
    out.put(("records", [node.stop() for node in simulated]))


# --------------------------------------------------------------------------------------- etcd side
def scrape(endpoint: str) -> dict[str, float]:
    """etcd's Prometheus counters and gauges that the bench reads, summed over their labels where it says so."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    return parse_metrics(text)


WANTED = {
    "grpc_server_msg_received_total": "requests",
    "etcd_network_client_grpc_received_bytes_total": "bytes_in",
    "etcd_network_client_grpc_sent_bytes_total": "bytes_out",
    "etcd_debugging_mvcc_watch_stream_total": "watch_streams",
    "etcd_debugging_mvcc_watcher_total": "watchers",
}


def parse_metrics(text: str) -> dict[str, float]:
    """Sums of the `WANTED` series by short name, and `requests/METHOD` per gRPC method."""
    found: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if name not in WANTED:
            continue
        found[WANTED[name]] += float(value)
        if name == "grpc_server_msg_received_total":
            method = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if "=" in part)
            found["requests/" + method.get("grpc_method", "?").strip('"')] += float(value)
    return dict(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------- analysis
def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


@dataclass(frozen=True)
class Advance:
    """One phase change as the nodes lived it (seconds since the epoch)."""

    last_ack: float
    committed: float
    all_seen: float


def advances(records: Sequence[Mapping[str, Any]], first: int, last: int) -> list[Advance]:
    """The phase changes out of phases of iterations `first`..`last - 1` whose every node saw the next."""
    acked: dict[Key, list[float]] = defaultdict(list)
    seen: dict[Key, list[float]] = defaultdict(list)
    committed: dict[Key, float] = {}
    for record in records:
        for i, p, t in record["acked"]:
            acked[(i, p)].append(t)
        for i, p, t in record["seen"]:
            seen[(i, p)].append(t)
        for i, p, t in record["advanced"]:
            committed[(i, p)] = t
    found = []
    for iteration in range(first, last):
        for phase in CYCLE:
            state = PhaseState(iteration=iteration, phase=phase, weight_version=0)
            after = next_state(state)
            key, next_key = (iteration, phase.value), (after.iteration, after.phase.value)
            if key in acked and next_key in committed and len(seen[next_key]) == len(records):
                found.append(Advance(max(acked[key]), committed[next_key], max(seen[next_key])))
    return found


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {"p50": round(1000 * percentile(values, 50), 2), "p99": round(1000 * percentile(values, 99), 2)}


# ------------------------------------------------------------------------------------------ a run
class _Observer:
    """The bench's own view of the job: every change of the phase and of the leader key, through watches."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = connect(endpoint)
        self.keys = Keys(JOB)
        self.events: queue.Queue[tuple[str, float, int, bytes]] = queue.Queue()
        self._watches = [
            self.client.add_watch_callback(self.keys.phase, self._on("phase")),
            self.client.add_watch_callback(self.keys.leader, self._on("leader")),
        ]

    def _on(self, what: str) -> Any:
        def callback(response: Any) -> None:
            for event in getattr(response, "events", []):
                self.events.put((what, time.time(), event.mod_revision, event.value))

        return callback

    def next(self, timeout: float) -> tuple[str, float, int, Any]:
        """(what changed, when it was seen, its revision, the phase state or the leader's node id, None if deleted)"""
        what, at, revision, value = self.events.get(timeout=timeout)
        if not value:
            return what, at, revision, None
        return what, at, revision, decode(PhaseState, value) if what == "phase" else decode(LeaderRecord, value).node

    def keys_held(self) -> int:
        from pyetcd.utils import prefix_range_end

        root = self.keys.root
        return self.client.get_response(root, range_end=prefix_range_end(root.encode()), count_only=True).count

    def revoke_leader(self) -> tuple[str, int]:
        """Revoke the leader's lease, as if it hung past its TTL: (who led, the store revision after it)."""
        value, meta = self.client.get(self.keys.leader)
        self.client.revoke_lease(meta.lease_id)
        revision = self.client.get_response(self.keys.leader, count_only=True).header.revision
        return decode(LeaderRecord, value).node, revision

    def close(self) -> None:
        for watch in self._watches:
            self.client.cancel_watch(watch)
        self.client.close()


@contextmanager
def _workers(
    endpoint: str, nodes: list[str], processes: int, node_grace: float
) -> Iterator[tuple[Any, Any, list[Any], Any]]:
    context = multiprocessing.get_context("spawn")
    go, stop, out = context.Event(), context.Event(), context.Queue()
    procs = [
        context.Process(
            target=_worker,
            args=(endpoint, mine, nodes, node_grace),
            kwargs={"go": go, "stop": stop, "out": out},
            daemon=True,
        )
        for mine in slices(nodes, processes)
    ]
    for proc in procs:
        proc.start()
    try:
        yield go, stop, procs, out
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def run_one(count: int, *, processes: int, warmup: int, iterations: int, timeout: float) -> dict[str, Any]:
    nodes = node_ids(count)
    node_grace = 2.0 * TTL  # a deposed leader re-registers within a third of its TTL
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp, LocalEtcd(tmp) as etcd:
        endpoint = etcd.endpoint
        with _workers(endpoint, nodes, processes, node_grace) as (go, stop, procs, out):
            pids = [out.get(timeout=timeout)[1] for _ in procs]
            observer = _Observer(endpoint)
            try:
                measured = _drive(
                    observer, go, pids=pids, etcd_pid=etcd.pid, warmup=warmup, iterations=iterations, timeout=timeout
                )
            finally:
                observer.close()
                stop.set()
            records = [r for _ in procs for r in out.get(timeout=timeout)[1]]
    moves = advances(records, warmup, warmup + iterations)
    return {
        "nodes": count,
        "processes": len(procs),
        "iterations": iterations,
        "phase_changes": len(moves),
        "advance_ms": summary_ms([m.all_seen - m.last_ack for m in moves]),
        "barrier_ms": summary_ms([m.committed - m.last_ack for m in moves]),
        "fanout_ms": summary_ms([m.all_seen - m.committed for m in moves]),
        **measured,
    }


def _drive(
    observer: _Observer, go: Any, *, pids: list[int], etcd_pid: int, warmup: int, iterations: int, timeout: float
) -> dict[str, Any]:
    """Start the nodes, measure the window of iterations, then revoke the leader's lease and time the failover."""
    deadline = time.monotonic() + timeout
    go.set()
    end = warmup + iterations
    window: dict[str, tuple[float, dict[str, float], tuple[float, float]]] = {}
    keys_held: list[int] = []
    revoked: tuple[float, int] | None = None
    elected: tuple[float, str] | None = None
    resumed_at = 0.0
    deposed = ""

    def mark() -> tuple[float, dict[str, float], tuple[float, float]]:
        return time.time(), scrape(observer.endpoint), (cpu_seconds(etcd_pid), sum(cpu_seconds(p) for p in pids))

    while not (elected and resumed_at):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the simulated job did not finish {end + 1} iterations and a failover in {timeout:g} s")
        try:
            what, at, revision, value = observer.next(timeout=left)
        except queue.Empty:
            continue
        if what == "leader":
            if revoked and value is not None and revision > revoked[1] and elected is None:
                elected = at - revoked[0], value
            continue
        state: PhaseState | None = value
        if state is None:
            continue
        if state.phase is Phase.FAILED:
            raise RuntimeError(f"the simulated job failed in iteration {state.iteration}")
        if revoked and revision > revoked[1]:
            resumed_at = resumed_at or at
        elif state.phase is Phase.TRAIN and state.iteration in (warmup, end):
            window["start" if state.iteration == warmup else "end"] = mark()
        elif state.phase is Phase.ONLOAD and warmup <= state.iteration < end:
            keys_held.append(observer.keys_held())
        elif state.phase is Phase.ROLLOUT and state.iteration == end and revoked is None:
            revoked_at = time.time()
            deposed, revision_after = observer.revoke_leader()
            revoked = revoked_at, revision_after
    assert revoked is not None
    assert elected is not None
    (t0, before, cpu0), (t1, after, cpu1) = window["start"], window["end"]
    per = 1.0 / iterations

    def rate(name: str) -> float:
        return (after.get(name, 0.0) - before.get(name, 0.0)) * per

    methods = {k.split("/", 1)[1]: round(rate(k), 1) for k in after if k.startswith("requests/")}
    return {
        "iteration_s": round((t1 - t0) * per, 4),
        "requests": round(rate("requests"), 1),
        "requests_by_method": {k: v for k, v in sorted(methods.items()) if v},
        "bytes_in": round(rate("bytes_in")),
        "bytes_out": round(rate("bytes_out")),
        "keys": max(keys_held),
        "watch_streams": after["watch_streams"],
        "watchers": after["watchers"],
        "etcd_cpu_s": round((cpu1[0] - cpu0[0]) * per, 4),
        "node_cpu_s": round((cpu1[1] - cpu0[1]) * per, 4),
        "failover": {
            "deposed": deposed,
            "elected": elected[1],
            "elected_s": round(elected[0], 3),
            "resumed_s": round(resumed_at - revoked[0], 3),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeshare bench nodes", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32, 128, 256], help="simulated node counts")
    parser.add_argument("--processes", type=int, default=4, help="worker processes the nodes are spread over")
    parser.add_argument("--warmup", type=int, default=1, help="iterations before the measured window")
    parser.add_argument("--iterations", type=int, default=5, help="iterations measured")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one node count may take")
    args = parser.parse_args(argv)
    bad = [n for n in args.nodes if n < 2]
    if bad or args.processes < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error(f"need --nodes >= 2 (got {args.nodes}), --processes >= 1, --iterations >= 1, --warmup >= 0")
    for count in args.nodes:
        _emit(
            **run_one(
                count, processes=args.processes, warmup=args.warmup, iterations=args.iterations, timeout=args.timeout
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
