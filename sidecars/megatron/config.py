"""The trainer's section of the run's config (`trainer.*`) and the document each rank runs from.

`RankConfig` is what the launcher writes to `<run dir>/trainer-<node>.json` and every torchrun rank reads
(`python -m sidecars.megatron.rank_main <file>`): the trainer section as the user set it, the
algorithm section, and the few facts of the run the ranks need.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Dtype, Section
from engine.algorithms.config import AlgoSection
from engine.config import RolloutConfig, RunConfig


class ColdStartConfig(Section):
    """Supervised warm-up on answered prompts before RL: a random model earns no reward to learn from."""

    KEY = "trainer.cold_start"
    fraction: float = 0.1  # share of task.pool_size, at most a tenth; 0 skips it
    # A JSONL file of {"prompt", "response"} records (`timeshare long2short shortest` writes one): the cold
    # start trains on every one of them instead of the task's demonstrations of `fraction` of the pool.
    data: str | None = None
    # Enough to teach the answer's form, not to settle every answer: the cold start stops after the
    # first epoch whose mean loss is at most target_loss (null: after `epochs`, the most it runs).
    # On the default task a fixed number of epochs gave starts far apart from one seed to the next
    # (10 epochs: loss 0.59 and 2.7 % held-out accuracy, or 0.41 and 13 %; 30 epochs: 29 % to 46 %),
    # and RL adds little to a strong start: the tiny model levels off near 50 %.
    epochs: int = Field(60, ge=1)
    target_loss: float | None = Field(0.25, gt=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _at_most_a_tenth(self) -> ColdStartConfig:
        if not 0 <= self.fraction <= 0.1:
            raise ConfigError(
                f"trainer.cold_start.fraction must be in [0, 0.1] (at most a tenth of the pool), got {self.fraction}"
            )
        if self.data is not None and self.fraction == 0:
            raise ConfigError(
                "trainer.cold_start.fraction=0 skips the cold start, so trainer.cold_start.data would not be read; "
                "set one of them"
            )
        return self


class TrainerConfig(Section):
    """Megatron's optimisation: one trainer for every run, keys set directly (`trainer.lr=1e-4`)."""

    KEY = "trainer"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)  # end of the cosine decay
    warmup_iterations: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_groups: int = Field(32, ge=1)  # prompt groups per micro-batch
    updates_per_batch: int = Field(2, ge=1)  # optimizer steps per rollout batch
    # Several trajectories per row (block-diagonal mask) instead of one padded row each: the same
    # logprobs and gradients, less compute on padding (sidecars/megatron/packing.py).
    packing: bool = True
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainerConfig:
        if self.min_lr > self.lr:
            raise ConfigError(f"trainer.min_lr must be in [0, trainer.lr={self.lr}], got {self.min_lr}")
        return self


class RankConfig(Section):
    """What every trainer rank runs from; the launcher fills it in from the run's config."""

    KEY = "rank"
    run_dir: str
    model_dir: str
    engine_url: str  # the node's checkpoint engine
    engine_token: str | None = None  # its bearer token, when its API is not on loopback
    job: str
    node: str
    # Only the head's trainer writes each version (global rank 0); the other nodes' engines pull it.
    exports: bool = True
    # Where the exporting rank writes each version: transfer.local as the launcher resolved it for this node.
    weight_region: Literal["shm", "cuda_ipc"]
    start_iteration: int = Field(ge=0)  # > 0: resume from the checkpoint of this iteration
    # From the launcher's sections (model, parallel, phase), which the ranks' layer does not import.
    tensor_parallel: int = Field(ge=1)
    expert_parallel: int = Field(ge=1)
    dtype: Dtype
    phase_timeout: float = Field(gt=0)
    run: RunConfig  # iterations (the rank exits at TRAIN of iterations + 1), checkpoint_every, seed, mode
    rollout: RolloutConfig  # the one that runs: temperature (vLLM's logprobs are of logits / temperature)
    trainer: TrainerConfig
    algo: AlgoSection
