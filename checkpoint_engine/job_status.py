"""`timeshare status`: a job's state read from etcd alone, for a person watching a run on any node.

Consumes: an etcd client and a job name (the keys of `etcd_keys`). Produces `JobStatus`: the phase and
iteration, the leader, every node (lease live or not) with its vLLM's state and the weight version it
loaded, and the seconds of each phase of the last iteration; `format_status` renders it as a few lines.
Reads only: it takes no lease, so it never shows up as a node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from checkpoint_engine.contracts.phases import CYCLE, Phase, PhaseState
from checkpoint_engine.etcd_keys import KEY_ROOT, Ack, Keys, LeaderRecord, NodeStatus, decode, last_segment

if TYPE_CHECKING:
    import pyetcd


class NoSuchJob(LookupError):
    pass


@dataclass(frozen=True)
class NodeView:
    node: str
    lease: bool  # the node's lease lives (its engine heartbeats)
    host: str
    pid: int | None
    vllm: str  # what its last engine-owned ack says: started, serving, terminated, kept alive; "-" before any
    weight_version: int | None  # the version its vLLM last loaded
    error: str  # the error it acked in this or the last iteration, if any


@dataclass(frozen=True)
class JobStatus:
    job: str
    phase: PhaseState | None
    leader: str | None
    nodes: list[NodeView]
    last_iteration: int | None  # the iteration `phase_seconds` describes
    phase_seconds: dict[str, float]


def job_names(client: pyetcd.MultiEndpointEtcd3Client, starting: str = "") -> list[str]:
    """The jobs that have keys in this etcd (those whose name begins with `starting`)."""
    keys = client.get_prefix(f"{KEY_ROOT}/{starting}", keys_only=True)
    return sorted({meta.key.decode().split("/")[2] for _, meta in keys})


def read_status(client: pyetcd.MultiEndpointEtcd3Client, job: str) -> JobStatus:
    """`job`'s state now; `NoSuchJob` naming the jobs there are when etcd holds nothing of it."""
    keys = Keys(job)
    value, _ = client.get(keys.phase)
    phase = decode(PhaseState, value) if value is not None else None
    leader_value, _ = client.get(keys.leader)
    leased = {last_segment(m.key): decode(NodeStatus, v) for v, m in client.get_prefix(keys.nodes)}
    if phase is None and not leased:
        raise NoSuchJob(f"no job {job!r} in etcd; jobs there: {job_names(client) or 'none'}")
    acks: dict[int, dict[Phase, dict[str, Ack]]] = {}
    for v, _ in client.get_prefix(keys.all_acks):
        ack = decode(Ack, v)
        acks.setdefault(ack.iteration, {}).setdefault(ack.phase, {})[ack.node] = ack
    nodes = sorted(set(leased) | {n for by_phase in acks.values() for by_node in by_phase.values() for n in by_node})
    views = [_node_view(n, leased.get(n), acks) for n in nodes]
    last = _last_whole_iteration(acks, phase)
    return JobStatus(
        job=job,
        phase=phase,
        leader=decode(LeaderRecord, leader_value).node if leader_value is not None else None,
        nodes=views,
        last_iteration=last,
        phase_seconds=_phase_seconds(acks, last) if last is not None else {},
    )


def _node_view(node: str, lease: NodeStatus | None, acks: dict[int, dict[Phase, dict[str, Ack]]]) -> NodeView:
    vllm, version, error = "-", None, ""
    for iteration in sorted(acks):
        for phase in CYCLE:
            ack = acks[iteration].get(phase, {}).get(node)
            if ack is None:
                continue
            error = ack.error or error
            if phase is Phase.START_VLLM:
                vllm = "started" if not ack.payload.get("kept_alive") else "kept alive"
            elif phase is Phase.UPDATE_WEIGHTS and "weight_version" in ack.payload:
                vllm, version = "serving", int(ack.payload["weight_version"])
            elif phase is Phase.TERMINATE_VLLM:
                vllm = "kept alive" if ack.payload.get("kept_alive") else "terminated"
    return NodeView(
        node=node,
        lease=lease is not None,
        host=lease.host if lease else "?",
        pid=lease.pid if lease else None,
        vllm=vllm,
        weight_version=version,
        error=error,
    )


def _last_whole_iteration(acks: dict[int, dict[Phase, dict[str, Ack]]], phase: PhaseState | None) -> int | None:
    """The newest iteration before the current one with acks (the current one is still running)."""
    done = [i for i in acks if phase is None or i < phase.iteration]
    return max(done) if done else None


def _phase_seconds(acks: dict[int, dict[Phase, dict[str, Ack]]], iteration: int) -> dict[str, float]:
    """Each phase's seconds in `iteration`: from the last ack of the phase before to its own last ack;
    TRAIN's from the trainer's report when the iteration before is pruned already."""
    seconds: dict[str, float] = {}
    before = acks.get(iteration - 1, {}).get(Phase.ONLOAD)
    end = max(a.acked_at for a in before.values()) if before else None
    for phase in CYCLE:
        by_node = acks[iteration].get(phase)
        if not by_node:
            continue
        done = max(a.acked_at for a in by_node.values())
        if end is not None:
            seconds[phase.value.lower()] = max(done - end, 0.0)
        elif phase is Phase.TRAIN:
            reported = [a.payload.get("metrics", {}).get("train/seconds") for a in by_node.values()]
            if all(isinstance(r, (int, float)) for r in reported):
                seconds["train"] = max(reported)
        end = done
    return seconds


def format_status(s: JobStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if s.phase is None:
        head = f"job {s.job}: not started (no phase yet)"
    else:
        head = (
            f"job {s.job}: {s.phase.phase.value} of iteration {s.phase.iteration} (weight version "
            f"{s.phase.weight_version}) for {now - s.phase.started_at:.1f} s"
        )
    lines = [f"{head}; leader {s.leader or 'none'}"]
    rows = [("node", "lease", "host", "pid", "vLLM", "version", "error")]
    for n in s.nodes:
        version = "-" if n.weight_version is None else str(n.weight_version)
        rows.append((n.node, "live" if n.lease else "lost", n.host, str(n.pid or "-"), n.vllm, version, n.error or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if s.phase_seconds:
        times = " ".join(f"{p} {t:.1f}s" for p, t in s.phase_seconds.items())
        lines.append(f"iteration {s.last_iteration}: {times} (total {sum(s.phase_seconds.values()):.1f}s)")
    return "\n".join(lines)
