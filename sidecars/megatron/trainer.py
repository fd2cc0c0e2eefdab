"""One trainer rank's model work: supervised cold start, logprob recomputation and RL updates.

Consumes `TrainBatch`es (engine/batch.py) and the algorithm's config; produces optimizer steps
and per-step metrics, including the gap between the rollout's logprobs and the trainer's on the
same tokens (the check that the pushed weights are what vLLM sampled with). Works under tensor
parallelism (vocab-parallel logprobs), data parallelism (groups split over DP ranks, gradients
averaged: `gradients.py`) and, for MoE models, expert parallelism (`expert_parallel.py`).
No phases and no processes here: `rank_main.py` drives this from the job's phase.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from engine.algorithms import AlgoConfig, policy_loss
from engine.algorithms.logprobs import vocab_parallel_token_logprobs
from engine.algorithms.losses import stale_token_weights, value_loss
from engine.batch import TrainBatch, with_advantages
from sidecars.megatron import compat, gradients
from sidecars.megatron import model as mg
from sidecars.megatron.arch import ModelArch
from sidecars.megatron.config import TrainerConfig
from sidecars.megatron.expert_parallel import expert_parallel_size, micro_steps, pad_to_expert_group
from sidecars.megatron.packing import pack, sequence_lengths, unpack_targets

log = logging.getLogger("timeshare.trainer")


def lr_at(step: int, cfg: TrainerConfig, iterations: int) -> float:
    """Linear warm-up over `warmup_iterations`, then cosine from lr down to min_lr at the last iteration."""
    if step < cfg.warmup_iterations:
        return cfg.lr * (step + 1) / cfg.warmup_iterations
    span = max(iterations - cfg.warmup_iterations, 1)
    progress = min((step - cfg.warmup_iterations) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _tp():
    from megatron.core import parallel_state

    return parallel_state


class Trainer:
    def __init__(
        self,
        model_dir: str | Path,
        cfg: TrainerConfig,
        algo: AlgoConfig,
        *,
        iterations: int,  # RL iterations: the cosine schedule reaches min_lr at the last one
        temperature: float,  # vLLM's sampling temperature: its logprobs are of logits / temperature
        seed: int,
        dtype: str,  # of the parameters: "float32" or "bfloat16"
    ) -> None:
        self.arch = ModelArch.from_pretrained(model_dir)
        self.cfg, self.algo = cfg, algo
        self.iterations, self.temperature, self.seed = iterations, temperature, seed
        self.model = mg.build_model(self.arch, params_dtype=getattr(torch, dtype))
        mg.load_hf_weights(self.model, mg.read_hf_tensors(model_dir), self.arch)
        # ppo's critic: a linear value head on the last hidden states of the policy's own forward pass
        # (read by a hook on the final norm), trained with it; zero at first, so the first advantages
        # are the returns.
        self.value_head: torch.nn.Linear | None = None
        self._hidden: torch.Tensor | None = None
        if algo.needs_critic:
            self.value_head = torch.nn.Linear(self.arch.hidden, 1, device=compat.device(), dtype=getattr(torch, dtype))
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            self.model.decoder.final_layernorm.register_forward_hook(self._keep_hidden)
        self.optimizer = compat.make_optimizer(self.parameters(), cfg.lr, cfg.weight_decay)
        # Packing hands the attention a block-diagonal mask. Transformer Engine's attention, built for
        # a causal mask, would not apply it (its packed path takes cu_seqlens in THD layout, not wired
        # here): with TE the rows stay padded.
        self.packing = cfg.packing and not mg.use_transformer_engine()
        if cfg.packing and not self.packing:
            log.warning("trainer.packing is off: Transformer Engine's attention here takes no block-diagonal mask")
        self.step = 0  # rollout batches trained on: the learning-rate schedule's clock (one per iteration)
        # The reference policy of a KL term (algo.kl_coef > 0): this rank's parameters when RL began
        # (after the cold start), kept in host memory and checkpointed with the trainer's state.
        self.reference: dict[str, torch.Tensor] | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the model's parameters, and the value head's under ppo."""
        head = [] if self.value_head is None else list(self.value_head.parameters())
        return [*self.model.parameters(), *head]

    def _keep_hidden(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._hidden = output  # [seq, batch, hidden]: the final norm's output, the output layer's input

    # ------------------------------------------------------------------------------ logprobs
    def _logprobs(self, input_ids: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        return self._forward(input_ids, lengths)[0]

    def _forward(
        self, input_ids: torch.Tensor, lengths: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p(target) for targets input_ids[:, 1:] under the current weights [B, L-1], and under ppo
        the critic's value of each target's state (the tokens before it) [B, L-1]. With the rows'
        `lengths` (prompt + response), the rows are packed for the forward pass."""
        ps = _tp()
        dev = compat.device()
        width = input_ids.shape[1]
        if lengths is None:
            tokens = input_ids
            positions = torch.arange(width).unsqueeze(0).expand_as(tokens)
            mask = compat.causal_mask(width)
        else:
            packed = pack(input_ids, list(lengths))
            tokens, positions, mask = packed.tokens, packed.positions, packed.mask
        rows, cols = tokens.shape
        tokens, positions, mask = pad_to_expert_group(tokens, positions, mask)
        tokens = tokens.to(dev)
        logits = self.model(tokens, positions.to(dev), mask.to(dev))[:rows, : cols - 1]
        tokens = tokens[:rows, :cols]
        vocab_start = ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        logp = vocab_parallel_token_logprobs(
            logits,
            tokens[:, 1:],
            vocab_start,
            group=ps.get_tensor_model_parallel_group(),
            temperature=self.temperature,
        )
        values = None
        if self.value_head is not None:
            values = self.value_head(self._hidden[:cols, :rows]).squeeze(-1).transpose(0, 1)[:, :-1].float()
        if lengths is None:
            return logp, values
        return unpack_targets(logp, packed, width), None if values is None else unpack_targets(values, packed, width)

    @torch.no_grad()
    def recompute(
        self, input_ids: torch.Tensor, lengths: Sequence[int] | None = None, chunk: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward` without gradients, `chunk` rows at a time: logprobs, and the values under ppo."""
        self.model.eval()
        parts = [
            self._forward(input_ids[i : i + chunk], None if lengths is None else lengths[i : i + chunk])
            for i in range(0, len(input_ids), chunk)
        ]
        logp = torch.cat([p[0].cpu() for p in parts])
        return logp, None if self.value_head is None else torch.cat([p[1].cpu() for p in parts])

    def recompute_logprobs(self, input_ids: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        return self.recompute(input_ids, lengths)[0]

    def _lengths(self, batch: TrainBatch) -> list[int] | None:
        """The rows' lengths when packing (trainer.packing), else None: one padded row per trajectory."""
        return sequence_lengths(batch.versions) if self.packing else None

    def _host_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def _set_parameters(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(values[name])

    def reference_logprobs(self, input_ids: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """log p_ref(target): the reference's parameters swapped in for the forward passes, then back."""
        live = self._host_parameters()
        self._set_parameters(self.reference)
        try:
            return self.recompute_logprobs(input_ids, lengths)
        finally:
            self._set_parameters(live)

    # -------------------------------------------------------------------------------- RL step
    def _my_groups(self, n_groups: int) -> list[int]:
        """The groups this data-parallel rank trains on (round-robin over DP ranks)."""
        ps = _tp()
        rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        return list(range(rank, n_groups, size))

    def train_on(self, batch: TrainBatch, rollout_version: int) -> dict[str, float]:
        """RL updates on one rollout batch sampled by weight version `rollout_version`."""
        g = batch.group_size
        lengths = self._lengths(batch)
        batch.old_logp, batch.old_values = self.recompute(batch.input_ids, lengths)
        fresh = (batch.versions == rollout_version) & (batch.loss_mask > 0)
        gap = (batch.old_logp - batch.rollout_logp).abs()[fresh]
        batch.token_weights = stale_token_weights(
            batch.old_logp, batch.rollout_logp, batch.versions, rollout_version, self.algo.stale_ratio_cap
        )
        reference: dict[str, float] = {}
        if self.algo.needs_reference:
            if self.reference is None:  # the first RL update: the policy as RL found it
                self.reference = self._host_parameters()
            batch.ref_logp = self.reference_logprobs(batch.input_ids, lengths)
            mask = batch.loss_mask > 0
            reference["train/kl_to_reference"] = (
                float((batch.old_logp - batch.ref_logp)[mask].mean()) if mask.any() else 0.0
            )
        with_advantages(batch, self.algo)
        n_groups = batch.size // g
        mine = self._my_groups(n_groups)
        metrics: dict[str, float] = {}
        lr = lr_at(self.step, self.cfg, self.iterations)
        self._set_lr(lr)
        for _ in range(self.cfg.updates_per_batch):
            metrics = self._update(batch, mine, n_groups, lengths)
        self.step += 1
        return {
            **metrics,
            "train/lr": lr,
            "logprob_gap/mean_abs": float(gap.mean()) if gap.numel() else 0.0,
            "logprob_gap/max_abs": float(gap.max()) if gap.numel() else 0.0,
            "train/tokens": float(batch.loss_mask.sum()),
            # -log pi of the tokens the policy itself sampled: an unbiased estimate of its per-token entropy.
            "train/entropy": float(-batch.old_logp[fresh].mean()) if fresh.any() else 0.0,
            **(
                {}
                if batch.old_values is None
                else {"train/value_mean": float(batch.old_values[batch.loss_mask > 0].mean())}
            ),
            **self._stale_metrics(batch, rollout_version),
            **reference,
        }

    def _stale_metrics(self, batch: TrainBatch, rollout_version: int) -> dict[str, float]:
        """The importance ratios pi_old / pi_rollout of the trained tokens older versions sampled
        (rollout.staleness=keep), before the cap; nothing when no such token trains."""
        stale = (batch.versions >= 0) & (batch.versions != rollout_version) & (batch.loss_mask > 0)
        if not stale.any():
            return {}
        ratio = torch.exp(batch.old_logp - batch.rollout_logp)[stale]
        return {
            "train/stale_tokens": float(stale.sum()),
            "train/stale_ratio_mean": float(ratio.mean()),
            "train/stale_ratio_max": float(ratio.max()),
            "train/stale_ratio_capped_share": float((ratio > self.algo.stale_ratio_cap).float().mean()),
        }

    def _update(
        self, batch: TrainBatch, mine: Sequence[int], n_groups: int, lengths: Sequence[int] | None
    ) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        g, total_loss, clipped, counted, critic_loss = batch.group_size, 0.0, 0.0, 0.0, 0.0
        step_groups = self.cfg.micro_batch_groups
        steps = math.ceil(len(mine) / step_groups)
        if expert_parallel_size() > 1:  # every EP rank runs as many forward passes
            steps = micro_steps(n_groups, _tp().get_data_parallel_world_size(), step_groups)
        for start in range(0, steps * step_groups, step_groups):
            groups = mine[start : start + step_groups]
            share = len(groups) / n_groups  # 0: a pass only to take part in the experts' collectives
            groups = groups or [0]
            rows = torch.tensor([grp * g + j for grp in groups for j in range(g)])
            logp, values = self._forward(batch.input_ids[rows], None if lengths is None else [lengths[r] for r in rows])
            dev = logp.device
            loss = policy_loss(
                self.algo,
                logp,
                batch.old_logp[rows].to(dev),
                batch.advantages[rows].to(dev),
                batch.loss_mask[rows].to(dev),
                rewards=batch.rewards[rows].to(dev),
                group_size=g,
                ref_logp=None if batch.ref_logp is None else batch.ref_logp[rows].to(dev),
                token_weights=None if batch.token_weights is None else batch.token_weights[rows].to(dev),
            )
            if values is not None:
                critic = value_loss(
                    values,
                    batch.old_values[rows].to(dev),
                    batch.returns[rows].to(dev),
                    batch.loss_mask[rows].to(dev),
                    clip=self.algo.value_clip,
                )
                loss = loss + self.algo.vf_coef * critic
                critic_loss += critic.item() * share
            with torch.no_grad():  # tokens whose ratio to pi_old left the clip range (kimi does not clip)
                ratio = torch.exp(logp - batch.old_logp[rows].to(dev))
                mask = batch.loss_mask[rows].to(dev) > 0
                mask = mask & (share > 0)
                clipped += float(((ratio < 1 - self.algo.clip_low) | (ratio > 1 + self.algo.clip_high))[mask].sum())
                counted += float(mask.sum())
            # Each micro-batch loss is a mean over its groups: weight it by its share of the batch.
            (loss * share).backward()
            total_loss += loss.item() * share
        self._reduce_gradients(average=False)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        # Each rank summed its own groups' shares: the whole batch's are the sums over the DP ranks.
        total_loss, clipped, counted, critic_loss = self._sum_over_data_parallel(
            [total_loss, clipped, counted, critic_loss]
        )
        clip = {} if self.algo.name == "kimi" else {"train/clip_fraction": clipped / max(counted, 1.0)}
        critic = {} if self.value_head is None else {"train/value_loss": critic_loss}
        return {"train/loss": total_loss, "train/grad_norm": grad_norm, **clip, **critic}

    def _mean_over_data_parallel(self, value: float) -> float:
        """`value` averaged over the DP ranks: every rank takes the same decision from it."""
        return self._sum_over_data_parallel([value])[0] / _tp().get_data_parallel_world_size()

    def _sum_over_data_parallel(self, values: list[float]) -> list[float]:
        ps = _tp()
        if ps.get_data_parallel_world_size() == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=compat.device())
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total.tolist()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """`parameters()` by name: what `gradients` tells dense, TP-sharded and expert ones apart by."""
        head = [] if self.value_head is None else list(self.value_head.named_parameters(prefix="value_head"))
        return [*self.model.named_parameters(), *head]

    def _reduce_gradients(self, average: bool) -> None:
        gradients.reduce_gradients(self._named_parameters(), average)

    def _clip_gradients(self) -> float:
        return gradients.clip_gradients(self._named_parameters(), self.cfg.grad_clip)

    # ------------------------------------------------------------------------- cold start SFT
    def supervised(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        epochs: int,
        lr: float,
        batch_size: int,
        target_loss: float | None = None,
    ) -> list[float]:
        """Cross-entropy on the answer tokens of (prompt ids, answer ids) pairs: the cold start that
        gives RL a policy which earns some reward. Stops after `epochs`, or after the first epoch whose
        mean loss (over every rank's steps) is at most `target_loss`. Returns the mean loss per epoch."""
        ps = _tp()
        rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        gen = torch.Generator().manual_seed(self.seed)
        losses = []
        self._set_lr(lr)
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            epoch_loss, steps = 0.0, 0
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start : start + batch_size]]
                part = chunk[rank::size] or chunk[:1]
                ids, mask = _pad_examples(part)
                self.optimizer.zero_grad(set_to_none=True)
                logp = self._logprobs(ids, [len(p) + len(a) for p, a in part] if self.packing else None)
                dev = logp.device
                loss = -(logp * mask.to(dev)).sum() / mask.sum().clamp(min=1).to(dev)
                loss.backward()
                self._reduce_gradients(average=True)
                self._clip_gradients()
                self.optimizer.step()
                epoch_loss, steps = epoch_loss + loss.item(), steps + 1
            losses.append(self._mean_over_data_parallel(epoch_loss / max(steps, 1)))
            if target_loss is not None and losses[-1] <= target_loss:
                break
        self.optimizer.state.clear()  # RL starts with fresh moments at its own learning rate
        return losses

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
            "reference": self.reference,
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        self.reference = state.get("reference")
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])


def _pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids [B, L] and a target mask [B, L-1] over the answer tokens."""
    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length - 1)
    for i, (p, a) in enumerate(examples):
        ids[i, : len(p) + len(a)] = torch.tensor(list(p) + list(a))
        mask[i, len(p) - 1 : len(p) - 1 + len(a)] = 1.0
    return ids, mask
