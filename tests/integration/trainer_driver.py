"""Run under torchrun by test_trainer.py: cold start, one RL step, offload/export/onload on one rank set.

Rank 0 writes results.json (losses, logprob gap, checks) and the weights exported after the step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import save_file

from engine.algorithms import AlgoConfig
from engine.batch import TrainBatch
from sidecars.megatron import model as mg
from sidecars.megatron.config import TrainerConfig
from sidecars.megatron.offload import Offloader
from sidecars.megatron.packing import pack
from sidecars.megatron.parallel import ParallelConfig, init_distributed, shutdown
from sidecars.megatron.trainer import Trainer


def synthetic_batch(trainer: Trainer, groups: int, g: int, seed: int) -> TrainBatch:
    """Random prompt/response tokens; rollout logprobs are the trainer's own (a perfect push)."""
    gen = torch.Generator().manual_seed(seed)
    b, prompt, response = groups * g, 5, 6
    ids = torch.randint(3, 40, (b, prompt + response), generator=gen)
    mask = torch.zeros(b, prompt + response - 1)
    mask[:, prompt - 1 :] = 1.0
    versions = torch.where(mask > 0, 0, -1)
    rollout = trainer.recompute_logprobs(ids) * mask
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    return TrainBatch(ids, mask, rollout, versions, rewards, torch.zeros(b), g, [f"p{i // g}" for i in range(b)])


def packing_differences(trainer: Trainer) -> dict[str, float]:
    """Largest differences between a padded and a packed forward/backward of trajectories of unequal
    length: the logprobs of their tokens and the gradient of every parameter."""
    gen = torch.Generator().manual_seed(3)
    lengths = [6 + (5 * i) % 9 for i in range(8)]  # 6..14 tokens
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros(len(lengths), max(lengths) - 1)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 40, (n,), generator=gen)
        mask[i, n - 5 : n - 1] = 1.0  # the last four tokens are the response
    weights = torch.randn(mask.shape, generator=gen) * mask
    logp, grads = {}, {}
    for packed in (False, True):
        trainer.model.zero_grad(set_to_none=True)
        logp[packed] = trainer._logprobs(ids, lengths if packed else None)
        (logp[packed] * weights.to(logp[packed].device)).sum().backward()
        grads[packed] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return {
        "logp": float(((logp[True] - logp[False]) * mask.to(logp[True].device)).abs().max()),
        "grad": max(float((grads[True][n] - grads[False][n]).abs().max()) for n in grads[False]),
        "rows_packed": float(len(pack(ids, lengths).tokens)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    args = ap.parse_args()
    init_distributed(ParallelConfig(tensor_parallel=args.tp, expert_parallel=args.ep))
    cfg = TrainerConfig(lr=1e-3, min_lr=1e-5, grad_clip=0.5, micro_batch_groups=1, updates_per_batch=1)
    trainer = Trainer(args.model, cfg, AlgoConfig(name="kimi"), iterations=1, temperature=1.0, seed=0, dtype="float32")
    out: dict = {}
    examples = [([1, 5 + i % 7, 9, 12], [20 + i % 5, 2]) for i in range(32)]
    out["sft_losses"] = trainer.supervised(examples, epochs=4, lr=3e-3, batch_size=8)
    again = Trainer(args.model, cfg, AlgoConfig(name="kimi"), iterations=1, temperature=1.0, seed=0, dtype="float32")
    out["sft_to_target"] = again.supervised(
        examples, epochs=40, lr=3e-3, batch_size=8, target_loss=out["sft_losses"][1]
    )
    out["packing"] = packing_differences(trainer)
    # Rows of a shape that depends on the data-parallel rank (under EP those ranks' forwards meet in the
    # experts' collectives; a TP group shares its rows): rank 0's logprobs must not depend on the others'.
    dp_rank = parallel_state.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(dp_rank + 5)
    uneven = torch.randint(3, 40, (2 + dp_rank, 9 + 3 * dp_rank), generator=gen)
    out["uneven_logp"] = trainer.recompute_logprobs(uneven).tolist()
    batch = synthetic_batch(trainer, groups=3, g=4, seed=1)
    out["train"] = trainer.train_on(batch, rollout_version=0)

    offloader = Offloader(trainer.model, trainer.optimizer)
    before = {k: t.clone() for k, t in mg.export_hf_weights(trainer.model, trainer.arch).items()}  # outlives a step
    moments = _optimizer_tensors(trainer.optimizer)
    out["offload"] = offloader.offload().to_dict()
    out["params_empty_while_offloaded"] = all(p.numel() == 0 for p in trainer.model.parameters())
    during = mg.export_hf_weights(trainer.model, trainer.arch, offloader.host_parameters())
    out["export_equal_while_offloaded"] = all(torch.equal(before[k], during[k]) for k in before)
    offloader.onload()
    after = mg.export_hf_weights(trainer.model, trainer.arch)
    out["export_equal_after_onload"] = all(torch.equal(before[k], after[k]) for k in before)
    back = _optimizer_tensors(trainer.optimizer)
    out["optimizer_equal_after_onload"] = bool(moments) and all(torch.equal(moments[k], back[k]) for k in moments)
    out["second_step"] = trainer.train_on(synthetic_batch(trainer, groups=3, g=4, seed=2), rollout_version=1)
    ppo = Trainer(args.model, cfg, AlgoConfig(name="ppo"), iterations=1, temperature=1.0, seed=0, dtype="float32")
    out["ppo"] = [ppo.train_on(synthetic_batch(ppo, groups=3, g=4, seed=s), rollout_version=s) for s in (1, 2)]
    if dist.get_rank() == 0:
        save_file(before, str(Path(args.out) / "after_step.safetensors"))
        (Path(args.out) / "results.json").write_text(json.dumps(out))
    shutdown()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    """Copies of every tensor of the optimizer's state (Adam's moments, its step), by parameter and name."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        (i, k): v.clone()
        for i, p in enumerate(params)
        for k, v in optimizer.state.get(p, {}).items()
        if torch.is_tensor(v)
    }


if __name__ == "__main__":
    main()
