"""The RL core's sections of the run's config: the iteration schedule (`run`) and the rollouts (`rollout`).

The controller reads both directly; the replay buffer gets its slice from `RolloutConfig.buffer()`.
The three rollout lengths are checked together on what runs (`check_lengths`), since a long-context
preset (launch) may replace them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.contracts.config import ConfigError, Lifecycle, Section
from engine.replay_buffer import PartialRolloutConfig, StalenessMode


class RunConfig(Section):
    KEY = "run"
    name: str = "scratchpad-kimi"  # the run directory is <root>/<name>-<time>
    root: str = "runs"  # run directories go under it
    seed: int = Field(0, ge=0)
    iterations: int = Field(24, ge=1)
    eval_every: int = Field(4, ge=1)  # held-out eval every N iterations, plus at the first and the last
    # iterations between checkpoints (buffer, sampler and RNG included), plus the last: the run's final model
    checkpoint_every: int = Field(1, ge=1)
    # A process that dies (trainer rank, engine) in a job whose every node this launcher starts (cluster=local,
    # local2) restarts the job from its newest checkpoint, or from the start before the first, at most this many
    # times per run.
    restarts: int = Field(2, ge=0)
    # A trainer rank that dies in a one-node job: torchrun starts the node's ranks again, at most this many
    # times per start of the job, and they take the job up at its next trainer phase from the checkpoint that
    # phase needs, while the engine, vLLM, etcd and the controller stay. Past that, with several nodes (whose
    # ranks would all have to start again together), or without that checkpoint, `restarts` applies.
    trainer_restarts: int = Field(2, ge=0)
    progress: bool = True  # a progress bar on the terminal
    # What each iteration does, every phase run in turn either way. rl: roll out, then learn from it.
    # rollout_only: the trainer's TRAIN leaves the weights as they are, so vLLM serves the starting model each
    # iteration (a check of rollouts, rewards and the push; its batches can feed a train_only run).
    # train_only: ROLLOUT takes each version's batch from the run `batches_from` instead of generating
    # (vLLM still loads each version and serves the held-out evaluation).
    mode: Literal["rl", "rollout_only", "train_only"] = "rl"
    batches_from: str | None = None  # train_only: the run directory whose rollouts/ are trained on

    @model_validator(mode="after")
    def _plain_name(self) -> RunConfig:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.mode == "train_only" and self.batches_from is None:
            raise ConfigError(
                "run.mode=train_only needs run.batches_from, the run directory whose batches it trains on"
            )
        if self.mode != "train_only" and self.batches_from is not None:
            raise ConfigError(f"run.batches_from applies to run.mode=train_only only; got run.mode={self.mode!r}")
        return self

    def checkpoints_at(self, iteration: int) -> bool:
        """Whether TRAIN of `iteration` writes a checkpoint: every `checkpoint_every`, and the last TRAIN's."""
        return iteration % self.checkpoint_every == 0 or iteration == self.iterations


class RepeatDetection(Section):
    """Stop a trajectory, during generation, whose tail is an n-gram (n <= max_ngram) repeated
    min_repeats times back to back: vLLM ends it with finish reason "repeat" (its
    `repetition_detection`), and `reward.repeat_penalty` is subtracted from its reward."""

    KEY = "rollout.repeat"
    enabled: bool = False
    max_ngram: int = Field(20, ge=1)
    min_repeats: int = Field(10, ge=2)


class RolloutConfig(Section):
    """Sampling, partial rollouts (Kimi k1.5), vLLM's lifecycle and its share of the machine."""

    KEY = "rollout"
    # terminate (the design's default): vLLM is started for each rollout and killed after it.
    # keep_alive: vLLM stays up across iterations (on CPU it stays resident) and only loads each version.
    lifecycle: Lifecycle = "terminate"
    # keep_alive on GPUs: between rollouts vLLM sleeps (its CuMemAllocator) instead of holding the device:
    # 1 offloads its weights to host memory and frees the KV cache, 2 discards both (every version is pushed
    # whole anyway); START_VLLM wakes it. 0: it stays resident (the only choice on CPU).
    sleep_level: int = Field(0, ge=0, le=2)
    group_size: int = Field(8, ge=2)  # samples per prompt: advantages are relative to the group
    prompts_per_iteration: int = Field(256, ge=1)  # complete groups per training batch
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_response_tokens: int = Field(64, ge=1)  # a trajectory's total length cap, across iterations
    # Tokens a trajectory may grow per iteration; below max_response_tokens, unfinished trajectories
    # continue from the replay buffer next iteration (partial rollouts): with the default task, about
    # a quarter of each batch's trajectories were begun by an older version.
    iteration_token_budget: int = Field(32, ge=1)
    staleness: StalenessMode = "exclude"  # tokens of older versions: out of the loss (Kimi) | kept
    max_staleness: int | None = Field(None, ge=0)  # staleness=keep: tokens more than N versions old leave the loss
    max_rounds: int = Field(4, ge=1)  # generation rounds per ROLLOUT while no group has finished
    # A vLLM that dies during ROLLOUT is started again by the engine, with the same weights, and the
    # requests it lost go again: at most this many times per ROLLOUT before the job stops.
    vllm_restarts: int = Field(2, ge=0)
    eval_samples: int = Field(4, ge=1)  # k of pass@k on the held-out split
    # vLLM's KV cache, explicit: vLLM allocates it without measuring the memory left after loading the
    # model (on CPU it then also skips its warm-up pass), and a sidecar forked from the zygote, whose
    # resident size includes the zygote's pages, gets the same cache every time. The tiny model needs
    # 1 KiB per token: 0.25 GiB holds 1024 sequences of 256 tokens. null: vLLM sizes the cache itself
    # from gpu_memory_utilization.
    kv_cache_gib: float | None = Field(0.25, gt=0)
    # vLLM's share of accelerator memory (of host memory on CPU) when kv_cache_gib is null; on GPUs,
    # also the bound of what vLLM may hold besides the cache.
    gpu_memory_utilization: float = Field(0.08, gt=0, le=0.95)
    max_model_len: int = Field(256, ge=1)  # vLLM's context: prompt + response
    stop: str = "\n"  # responses end at this string; "" for none
    repeat: RepeatDetection = RepeatDetection()

    @model_validator(mode="after")
    def _sleep_keeps_alive(self) -> RolloutConfig:
        if self.sleep_level and self.lifecycle != "keep_alive":
            raise ConfigError(
                f"rollout.sleep_level={self.sleep_level} puts a vLLM kept between rollouts to sleep; it needs "
                f"rollout.lifecycle=keep_alive, not {self.lifecycle!r} (terminate kills vLLM instead)"
            )
        return self

    @model_validator(mode="after")
    def _max_staleness_keeps(self) -> RolloutConfig:
        if self.max_staleness is not None and self.staleness == "exclude":
            raise ConfigError(
                "rollout.max_staleness only applies to rollout.staleness=keep ('exclude' already masks every "
                f"token older than the current version), got {self.max_staleness}; set it to null"
            )
        return self

    def check_lengths(self) -> None:
        """budget <= max_response_tokens < max_model_len."""
        if self.iteration_token_budget > self.max_response_tokens:
            raise ConfigError(
                f"rollout.iteration_token_budget ({self.iteration_token_budget}) must be in "
                f"[1, rollout.max_response_tokens={self.max_response_tokens}]"
            )
        if self.max_response_tokens >= self.max_model_len:
            raise ConfigError(
                f"rollout.max_response_tokens ({self.max_response_tokens}) must be < rollout.max_model_len "
                f"({self.max_model_len}): the prompt needs room too"
            )

    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_gib is None else int(self.kv_cache_gib * 2**30)

    def buffer(self) -> PartialRolloutConfig:
        """The replay buffer's slice."""
        return PartialRolloutConfig(
            max_response_tokens=self.max_response_tokens,
            iteration_token_budget=self.iteration_token_budget,
            group_size=self.group_size,
            staleness=self.staleness,
            max_staleness=self.max_staleness,
        )
