"""Planning a weight push over many nodes: buckets, who sends and receives them, bytes per link, predicted time.

Consumes: the HF tensors of one weight version as (name, bytes) in export order, the job's layout (nodes, GPUs
per node) and bandwidths (measured on this machine, or figures for RDMA, PCIe and NVLink as parameters).
Produces: a `PushPlan` per strategy; pure, no processes, so it is tested with parametrized cases.

Three stages per bucket: the source (into the sending node's buffer: the trainer's export into shm here, H2D on
GPU), the transfer between nodes, the load (the received bytes into the node's rollout engine). Two strategies:
- `head`, what the job does today: one bucket, the head's whole weight region; the head writes it, every other
  node pulls all of it from the head (Mooncake), so the head's link carries (N - 1) x the model, then loads it;
  the stages run one after another.
- `ring`, the pipelined broadcast that checkpoint-engine runs over NCCL (and a Mooncake relay could): buckets of
  at most `bucket_bytes` (whole tensors) dealt over the nodes; each enters at its owner and passes along a ring
  of all nodes, so every link carries the model once whatever N; buckets take turns through each stage, and
  the stages of successive buckets overlap: one bucket's stages, plus (buckets - 1) x the slowest stage, plus a
  bucket-hop per further node (the fill).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["head", "ring"]
STRATEGIES: tuple[Strategy, ...] = ("head", "ring")


@dataclass(frozen=True)
class Bucket:
    index: int
    nbytes: int
    tensors: int
    first: str  # the first tensor's name, for reading a plan
    owner: int  # the node it enters the push at


@dataclass(frozen=True)
class Bandwidths:
    """GB/s (1e9 bytes per second) of each stage, for one node."""

    source: float  # a bucket into the sending node's buffer (trainer -> shm region; on GPU: D2H or H2D)
    link: float  # one node to another (Mooncake tcp here; G x the per-GPU RDMA rail on a cluster)
    load: float  # a received bucket into the node's rollout engine (shm -> vLLM; CUDA IPC / NVLink on GPU)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not v > 0}
        if bad:
            raise ValueError(f"bandwidths must be > 0 GB/s, got {bad}")


@dataclass(frozen=True)
class PushPlan:
    strategy: Strategy
    nodes: int
    model_bytes: int
    buckets: tuple[Bucket, ...]
    send_bytes: tuple[int, ...]  # per node
    recv_bytes: tuple[int, ...]  # per node
    link_bytes: dict[tuple[int, int], int]  # (from, to) -> bytes
    stage_seconds: dict[str, float]  # each stage's whole-push time alone
    predicted_seconds: float
    bottleneck: str  # the stage that sets the pace

    def summary(self) -> dict[str, object]:
        """The plan in one JSON-able record (per-node and per-link lists reduced to their maxima)."""
        return {
            "strategy": self.strategy,
            "nodes": self.nodes,
            "model_bytes": self.model_bytes,
            "buckets": len(self.buckets),
            "bucket_bytes_max": max(b.nbytes for b in self.buckets),
            "node_send_bytes_max": max(self.send_bytes),
            "node_recv_bytes_max": max(self.recv_bytes),
            "links": len(self.link_bytes),
            "link_bytes_max": max(self.link_bytes.values(), default=0),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "predicted_s": round(self.predicted_seconds, 3),
            "bottleneck": self.bottleneck,
        }


def make_buckets(tensors: Sequence[tuple[str, int]], bucket_bytes: int, nodes: int = 1) -> tuple[Bucket, ...]:
    """Whole tensors in order, a bucket closed before it would pass `bucket_bytes` (a tensor larger than that is a
    bucket of its own); owners dealt round-robin over `nodes`."""
    if bucket_bytes <= 0 or nodes < 1:
        raise ValueError(f"need bucket_bytes > 0 and nodes >= 1, got {bucket_bytes} and {nodes}")
    if not tensors:
        raise ValueError("no tensors to push")
    groups: list[list[tuple[str, int]]] = [[]]
    filled = 0  # bytes in the last group
    for name, nbytes in tensors:
        if groups[-1] and filled + nbytes > bucket_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, nbytes))
        filled += nbytes
    return tuple(
        Bucket(index=i, nbytes=sum(b for _, b in g), tensors=len(g), first=g[0][0], owner=i % nodes)
        for i, g in enumerate(groups)
    )


def plan_push(
    tensors: Sequence[tuple[str, int]], *, nodes: int, strategy: Strategy, bucket_bytes: int, bandwidths: Bandwidths
) -> PushPlan:
    """Who sends and receives which bytes over which links, and the predicted seconds of the whole push."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    total = sum(nbytes for _, nbytes in tensors)
    buckets = make_buckets(tensors, bucket_bytes, nodes) if strategy == "ring" else make_buckets(tensors, total)
    send, recv = [0] * nodes, [0] * nodes
    links: dict[tuple[int, int], int] = {}
    for bucket in buckets:
        hops = [(0, n) for n in range(1, nodes)] if strategy == "head" else _ring_hops(bucket.owner, nodes)
        for src, dst in hops:
            send[src] += bucket.nbytes
            recv[dst] += bucket.nbytes
            links[(src, dst)] = links.get((src, dst), 0) + bucket.nbytes
    gb = 1e9
    largest = max(b.nbytes for b in buckets)
    # The buckets take turns through each stage, as in checkpoint-engine: one bucket's source (its owner's H2D) at a
    # time, so the source stage carries the whole model whichever node owns a bucket.
    stages = {
        "source": total / gb / bandwidths.source,
        # the busiest node's link (its sends share it): the head's (N - 1) copies, or one ring link's share
        "transfer": max([*send, 0]) / gb / bandwidths.link,
        "load": total / gb / bandwidths.load,
    }
    one_bucket = {k: v * largest / total for k, v in stages.items()}
    if nodes == 1:
        stages["transfer"] = one_bucket["transfer"] = 0.0
    fill = (nodes - 2) * largest / gb / bandwidths.link if strategy == "ring" and nodes > 2 else 0.0
    slowest = max(stages, key=lambda k: stages[k])
    predicted = sum(one_bucket.values()) + (stages[slowest] - one_bucket[slowest]) + fill
    return PushPlan(
        strategy=strategy,
        nodes=nodes,
        model_bytes=total,
        buckets=buckets,
        send_bytes=tuple(send),
        recv_bytes=tuple(recv),
        link_bytes=links,
        stage_seconds=stages,
        predicted_seconds=predicted,
        bottleneck=slowest,
    )


def _ring_hops(owner: int, nodes: int) -> list[tuple[int, int]]:
    """A bucket's path from its owner around the ring: owner -> owner + 1 -> ... (every other node once)."""
    path = [(owner + k) % nodes for k in range(nodes)]
    return list(itertools.pairwise(path))
