"""Taken-token logprobs from vocab-parallel logits equal full-vocabulary ones, values and gradients,
across two real gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.algorithms.logprobs import token_logprobs, vocab_parallel_token_logprobs

pytestmark = pytest.mark.integration
WORLD = 2
VOCAB = 10


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, VOCAB, generator=g) * 4
    tokens = torch.randint(0, VOCAB, (3, 5), generator=g)
    return logits, tokens


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    logits, tokens = _inputs()
    shard = logits.chunk(WORLD, dim=-1)[rank].clone().requires_grad_(True)
    logp = vocab_parallel_token_logprobs(shard, tokens, vocab_start=rank * VOCAB // WORLD, temperature=0.7)
    (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()  # a non-uniform upstream gradient
    torch.save({"logp": logp.detach(), "grad": shard.grad}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_vocab_parallel_equals_full(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    logits, tokens = _inputs()
    full = logits.clone().requires_grad_(True)
    want = token_logprobs(full, tokens, temperature=0.7)
    (want * torch.arange(want.numel()).view_as(want)).sum().backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in results:
        assert torch.allclose(r["logp"], want.detach(), atol=1e-5)
    grads = torch.cat([r["grad"] for r in results], dim=-1)
    assert torch.allclose(grads, full.grad, atol=1e-5)
