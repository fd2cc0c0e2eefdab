"""Log-probabilities of the taken tokens, from full logits or from vocab-parallel logits.

With tensor parallelism Megatron's output layer leaves each rank a slice of the vocabulary
[vocab_start, vocab_start + V/tp); gathering full logits would cost V/tp-times more memory, so
the log-softmax is assembled from three all-reduces (max, sum of exps, target logit), with
gradients flowing through the differentiable all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V] over full vocabulary, tokens [...] -> log p(token) [...]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group=None, temperature: float = 1.0
) -> torch.Tensor:
    """Same as `token_logprobs` for this rank's vocabulary slice; every rank of `group` gets the result."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    logits = logits.float() / temperature
    vocab_end = vocab_start + logits.shape[-1]
    global_max = logits.detach().max(dim=-1).values
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)  # a constant shift: no gradient needed
    shifted = logits - global_max.unsqueeze(-1)
    sum_exp = all_reduce(shifted.exp().sum(dim=-1), group=group)
    local = (tokens >= vocab_start) & (tokens < vocab_end)
    index = (tokens - vocab_start).clamp(0, logits.shape[-1] - 1)
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1) * local
    target = all_reduce(target, group=group)
    return target - sum_exp.log()
