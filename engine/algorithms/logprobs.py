"""Log-probabilities of the taken tokens, from full logits or from vocab-parallel logits.

With tensor parallelism Megatron's output layer leaves each rank a slice of the vocabulary
[vocab_start, vocab_start + V/tp); gathering full logits would cost V/tp-times more memory, so
the log-softmax is assembled from three all-reduces (max, sum of exps, target logit).
Every rank then holds the same (replicated) loss, so the backward of the sum all-reduce is the
identity (Megatron's "reduce from model-parallel region"); torch's differentiable all_reduce
would sum the gradients again and scale them by the TP size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V] over full vocabulary, tokens [...] -> log p(token) [...]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group=None, temperature: float = 1.0
) -> torch.Tensor:
    """Same as `token_logprobs` for this rank's vocabulary slice; every rank of `group` gets the result."""
    import torch.distributed as dist

    logits = logits.float() / temperature
    vocab_end = vocab_start + logits.shape[-1]
    global_max = logits.detach().max(dim=-1).values
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)  # a constant shift: no gradient needed
    shifted = logits - global_max.unsqueeze(-1)
    sum_exp = _AllReduceSum.apply(shifted.exp().sum(dim=-1), group)
    local = (tokens >= vocab_start) & (tokens < vocab_end)
    index = (tokens - vocab_start).clamp(0, logits.shape[-1] - 1)
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1) * local
    target = _AllReduceSum.apply(target, group)
    return target - sum_exp.log()
