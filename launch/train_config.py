"""The run's configuration: every component's section in one tree, and the rules across sections.

Consumes: the composed Hydra config (`launch.config_loading.load_config`) or a run's saved
`config.json`. Produces one frozen `TrainConfig`, built once at start-up. Each section is defined
beside its owner, with its defaults (`engine.config`, `engine.tasks.config`,
`engine.algorithms.config`, `sidecars.megatron.config`, `checkpoint_engine.config`); the sections
only the launcher reads live here. Each component receives its own section, never raw keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from checkpoint_engine.config import PhaseConfig, TransferConfig
from checkpoint_engine.contracts.config import ConfigError, Dtype, Section
from checkpoint_engine.contracts.vllm_protocol import LoadFormat, VllmSettings
from checkpoint_engine.etcd_client import parse_endpoint
from checkpoint_engine.etcd_keys import attempt_namespace, check_name
from engine.algorithms.config import AlgoSection
from engine.config import RolloutConfig, RunConfig
from engine.rewards import RewardConfig
from engine.sampling import SamplerConfig
from engine.tasks.config import TaskConfig
from engine.tiny_model import SIZES, VALID_HEAD_DIMS, Arch, RopeScaling, TinyModelSpec, TokenizerKind
from sidecars.megatron.config import TrainerConfig

# The lengths a long-context preset decides for the rollout, and the context each preset names.
LENGTH_KEYS = ("max_model_len", "max_response_tokens", "iteration_token_budget")
PRESET_MAX_MODEL_LEN = {"32k": 32768, "128k": 131072}
# The TinyModelSpec fields `model` sets (the vocabulary's rounding is the spec's own).
TINY_FIELDS = ("arch", "rope_scaling", "tokenizer", "tie_embeddings", *(n for n in SIZES if n != "vocab_multiple"))
MOE_FIELDS = ("experts", "experts_per_token", "expert_intermediate")


class ModelConfig(Section):
    """The policy: an HF checkpoint (`path`), or a tiny model the launcher writes from the fields below."""

    KEY = "model"
    path: str | None = None  # an HF model directory; None: write the tiny model described below
    arch: Arch = "llama"
    rope_scaling: RopeScaling = "default"  # llama3: Llama 3.x's RoPE scaling (with arch=llama)
    tokenizer: TokenizerKind = "char"  # bpe: byte-level BPE with a ChatML chat template (engine.bpe_tokenizer)
    layers: int = Field(4, ge=1)
    hidden: int = Field(128, ge=1)
    heads: int = Field(4, ge=1)  # hidden / heads must be 32, 64 or 128 (vLLM's CPU attention rejects 16)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(256, ge=1)
    max_positions: int = Field(256, ge=1)  # the model's context; >= rollout.max_model_len
    tie_embeddings: bool = False
    experts: int = Field(4, ge=1)  # arch=qwen3_moe: routed experts per layer
    experts_per_token: int = Field(2, ge=1)  # arch=qwen3_moe: top-k
    expert_intermediate: int = Field(128, ge=1)  # arch=qwen3_moe: each expert's SwiGLU width
    dtype: Dtype = "float32"  # of the trainer's parameters and of vLLM

    @model_validator(mode="after")
    def _tiny_shape(self) -> ModelConfig:
        if self.path is not None:
            # The tiny fields describe a model we write; an HF checkpoint brings its own config.json.
            changed = [f"model.{n}" for n in TINY_FIELDS if getattr(self, n) != ModelConfig.model_fields[n].default]
            if changed:
                raise ConfigError(
                    f"{changed} describe the tiny model and cannot take effect with model.path={self.path!r}; "
                    "leave them at their defaults or set model.path=null"
                )
            return self
        if self.rope_scaling == "llama3" and self.arch != "llama":
            raise ConfigError(
                f"model.rope_scaling=llama3 is Llama 3.x's RoPE; it needs model.arch=llama, not {self.arch}"
            )
        if self.hidden % self.heads:
            raise ConfigError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        moe_keys = [n for n in MOE_FIELDS if getattr(self, n) != ModelConfig.model_fields[n].default]
        if moe_keys and self.arch != "qwen3_moe":
            raise ConfigError(f"{[f'model.{n}' for n in moe_keys]} apply to model.arch=qwen3_moe, not {self.arch}")
        if self.experts_per_token > self.experts:
            raise ConfigError(
                f"model.experts_per_token ({self.experts_per_token}) must be at most model.experts ({self.experts})"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if self.hidden // self.heads not in VALID_HEAD_DIMS:
            raise ConfigError(
                f"model.hidden / model.heads = {self.hidden // self.heads} must be one of {list(VALID_HEAD_DIMS)} "
                "(vLLM's CPU attention rejects other head sizes, 16 included)"
            )
        return self

    def tiny_spec(self, seed: int) -> TinyModelSpec:
        """What `engine.tiny_model.write_tiny_model` needs to write this model (model.path is None)."""
        if self.path is not None:
            raise ConfigError(f"model.path={self.path!r} is set: there is no tiny model to write")
        return TinyModelSpec(**{n: getattr(self, n) for n in TINY_FIELDS}, seed=seed)


class ParallelConfig(Section):
    KEY = "parallel"
    trainer_tp: int = Field(1, ge=1)  # Megatron tensor parallel; divides model.heads and model.kv_heads
    trainer_pp: int = Field(1, ge=1)  # must be 1: megatron-core's pipeline schedules allocate on 'cuda'
    trainer_dp: int = Field(1, ge=1)  # data parallel replicas
    # MoE models (model.arch=qwen3_moe): experts split over this many of the DP replicas; needs trainer_tp=1
    trainer_ep: int = Field(1, ge=1)
    vllm_tp: int = Field(1, ge=1)  # vLLM tensor parallel, independent of the trainer's

    @model_validator(mode="after")
    def _no_pipeline(self) -> ParallelConfig:
        if self.trainer_pp != 1:
            raise ConfigError(
                f"parallel.trainer_pp={self.trainer_pp}: pipeline parallel trainer is not supported "
                "(megatron-core's pipeline schedules allocate on 'cuda' and do not run on CPU); set it to 1"
            )
        if self.trainer_ep > 1 and self.trainer_tp > 1:
            raise ConfigError(
                f"parallel.trainer_ep={self.trainer_ep} with parallel.trainer_tp={self.trainer_tp}: an MoE trainer "
                "runs at trainer_tp=1, its experts split over the data-parallel replicas"
            )
        if self.trainer_dp % self.trainer_ep:
            raise ConfigError(
                f"parallel.trainer_ep={self.trainer_ep} must divide parallel.trainer_dp={self.trainer_dp} "
                "(the experts are split over the data-parallel replicas)"
            )
        return self

    @property
    def trainer_ranks(self) -> int:
        return self.trainer_tp * self.trainer_pp * self.trainer_dp


class LongContextConfig(Section):
    """A preset that replaces rollout's three lengths (partial rollouts grow long responses over iterations)."""

    KEY = "long_context"
    preset: Literal["none", "32k", "128k"] = "none"
    max_model_len: int | None = None
    max_response_tokens: int | None = None
    iteration_token_budget: int | None = None

    @model_validator(mode="after")
    def _preset_lengths(self) -> LongContextConfig:
        given = [n for n in LENGTH_KEYS if getattr(self, n) is not None]
        if self.preset == "none":
            if given:
                raise ConfigError(
                    f"{[f'long_context.{n}' for n in given]} apply only with a long_context.preset; "
                    "leave them null and set rollout.* instead"
                )
            return self
        missing = [f"long_context.{n}" for n in LENGTH_KEYS if n not in given]
        if missing:
            raise ConfigError(f"long_context.preset={self.preset!r} needs {missing} set")
        if self.max_model_len != PRESET_MAX_MODEL_LEN[self.preset]:
            raise ConfigError(
                f"long_context.max_model_len must be {PRESET_MAX_MODEL_LEN[self.preset]} for "
                f"long_context.preset={self.preset!r}, got {self.max_model_len}"
            )
        return self

    def rollout_lengths(self) -> dict[str, int]:
        """The rollout lengths this preset decides ({} for none)."""
        return {} if self.preset == "none" else {n: getattr(self, n) for n in LENGTH_KEYS}


class ClusterConfig(Section):
    """The job's nodes. The first is the head: it keeps the run directory (on a filesystem every node
    shares), starts etcd unless one is given, and runs the iteration controller; every node runs its
    engine, its vLLM and its trainer ranks (`timeshare train` with the same overrides on each node)."""

    KEY = "cluster"
    etcd: str | None = None  # HOST:PORT of the job's etcd; None: the head starts one (on etcd_port)
    nodes: tuple[str, ...] = Field(("node0",), strict=False)
    node: str = "node0"  # this process's node, one of nodes
    # The job's name (its run directory under run.root), the same on every node; None: the head's
    # `<run.name>-<time>`, which only nodes the head starts itself (local_nodes) can learn.
    job: str | None = None
    # This attempt of the job, the same on every node of it (the slurm script's:
    # `slurm-$SLURM_JOB_ID.$SLURM_RESTART_COUNT`). Its etcd keys (and weight regions) live under `<job>@<attempt>`,
    # so that the leader of a resumed or requeued job on an etcd that outlives jobs (cluster.etcd) never takes up
    # an earlier attempt's phase; the head removes the earlier attempts' keys. None: the job's name alone, cleared
    # at the start only where no other node runs.
    attempt: str | None = None
    address: str = "127.0.0.1"  # where the other nodes reach this node's engine, vLLM and Mooncake
    head_address: str = "127.0.0.1"  # where the other nodes reach the head's etcd and trainer rendezvous
    etcd_port: int = Field(0, ge=0, le=65535)  # of the etcd the head starts; 0: a free one
    trainer_port: int = Field(0, ge=0, le=65535)  # torchrun's rendezvous on the head; 0: a free one
    interface: str | None = None  # the network interface trainer ranks talk on (GLOO_SOCKET_IFNAME)
    # The head starts the other nodes on this machine, each in a network namespace of its own joined to
    # the head's by a veth pair (root needed; plain loopback otherwise): cluster=local2.
    local_nodes: bool = False
    engine_port: int = Field(0, ge=0, le=65535)  # checkpoint engine HTTP port; 0: pick a free one
    vllm_port: int = Field(0, ge=0, le=65535)  # 0: pick a free one
    # Containers per role: the directory (on a volume both containers mount at this path, like run.root) where
    # this node's vLLM container runs `timeshare vllm-zygote DIR`; None: the engine spawns vLLM's zygote itself.
    vllm_zygote: str | None = None

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def is_head(self) -> bool:
        return self.node == self.nodes[0]

    def namespace(self, job: str) -> str:
        """The name this attempt of `job` (its run directory's name) coordinates under in etcd."""
        return job if self.attempt is None else attempt_namespace(job, self.attempt)

    @model_validator(mode="after")
    def _names(self) -> ClusterConfig:
        if self.etcd is not None:
            try:
                parse_endpoint(self.etcd)
            except ValueError as e:
                raise ConfigError(f"cluster.etcd: {e}") from e
        if self.attempt is not None:
            try:
                check_name(self.attempt, "cluster.attempt")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        return self

    @model_validator(mode="after")
    def _nodes(self) -> ClusterConfig:
        if not self.nodes or len(set(self.nodes)) != len(self.nodes) or "" in self.nodes:
            raise ConfigError(
                f"cluster.nodes must be a non-empty list of distinct, non-empty names, got {list(self.nodes)}"
            )
        if self.node not in self.nodes:
            raise ConfigError(f"cluster.node must be one of cluster.nodes {list(self.nodes)}, got {self.node!r}")
        if self.engine_port and self.engine_port == self.vllm_port:
            raise ConfigError(f"cluster.engine_port and cluster.vllm_port must differ, both are {self.engine_port}")
        if self.vllm_zygote is not None and not Path(self.vllm_zygote).is_absolute():
            raise ConfigError(
                f"cluster.vllm_zygote must be an absolute path (both containers see it there), got {self.vllm_zygote!r}"
            )
        if self.vllm_zygote is not None and self.local_nodes:
            raise ConfigError("cluster.vllm_zygote serves one node; cluster.local_nodes starts two from one config")
        if self.local_nodes and len(self.nodes) != 2:
            raise ConfigError(
                f"cluster.local_nodes starts one node beside the head (two in all); cluster.nodes is {list(self.nodes)}"
            )
        if len(self.nodes) > 1 and not self.local_nodes:  # each node is started by someone else: they must agree
            missing = [k for k, v in (("job", self.job), ("trainer_port", self.trainer_port)) if not v]
            if self.etcd is None and not self.etcd_port:
                missing.append("etcd (or etcd_port)")
            if missing:
                raise ConfigError(
                    f"a job of {len(self.nodes)} nodes started node by node needs cluster.{', cluster.'.join(missing)} "
                    "set alike on every node, or cluster=local2 to start "
                    "them all from here"
                )
        return self


class TrainConfig(Section):
    """The whole run, checked across sections; components take their own section from it."""

    run: RunConfig = Field(default_factory=RunConfig)
    resume: str | None = None  # a run directory to resume
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    algo: AlgoSection = Field(default_factory=AlgoSection)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    phase: PhaseConfig = Field(default_factory=PhaseConfig)
    long_context: LongContextConfig = Field(default_factory=LongContextConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> TrainConfig:
        if self.transfer.local == "cuda_ipc" and self.parallel.vllm_tp > 1:
            raise ConfigError(
                f"transfer.local='cuda_ipc' with parallel.vllm_tp={self.parallel.vllm_tp}: every vLLM worker would "
                "open the region on the trainer's GPU (a CUDA context each, after vLLM sized its KV cache); use "
                "'shm' or 'auto' (shm there)"
            )
        if self.model.path is None and self.parallel.trainer_ep > 1:
            if self.model.arch != "qwen3_moe":
                raise ConfigError(
                    f"parallel.trainer_ep={self.parallel.trainer_ep} splits an MoE model's experts; "
                    f"model.arch={self.model.arch} is dense (use model.arch=qwen3_moe)"
                )
            if self.model.experts % self.parallel.trainer_ep:
                raise ConfigError(
                    f"model.experts ({self.model.experts}) must be divisible by "
                    f"parallel.trainer_ep ({self.parallel.trainer_ep})"
                )
        if self.model.path is None:
            for heads in ("heads", "kv_heads"):
                for tp in ("trainer_tp", "vllm_tp"):
                    n, size = getattr(self.model, heads), getattr(self.parallel, tp)
                    if n % size:
                        raise ConfigError(f"model.{heads} ({n}) must be divisible by parallel.{tp} ({size})")
        self._check_long_context()
        rollout = self.effective_rollout()
        if self.model.path is None and rollout.max_model_len > self.model.max_positions:
            source = (
                f"long_context.preset={self.long_context.preset!r} sets max_model_len {rollout.max_model_len}"
                if self.long_context.preset != "none"
                else f"rollout.max_model_len is {rollout.max_model_len}"
            )
            raise ConfigError(
                f"{source} but model.max_positions is {self.model.max_positions} (the tiny model's context); "
                f"set model.max_positions >= {rollout.max_model_len} or a shorter context"
            )
        if rollout.staleness == "keep" and self.algo.name == "kimi":
            raise ConfigError(
                "rollout.staleness='keep' trains older versions' tokens with importance weights, which kimi's "
                "per-sequence loss cannot take (Kimi k1.5 excludes them); use it with algo=grpo, dr_grpo, rloo, "
                "reinforce_pp or ppo, or keep rollout.staleness=exclude"
            )
        if self.reward.repeat_penalty and not rollout.repeat.enabled:
            raise ConfigError(
                f"reward.repeat_penalty={self.reward.repeat_penalty} never applies without repeat detection: set "
                "rollout.repeat.enabled=true, or the penalty to 0"
            )
        if len(self.cluster.nodes) > 1 and self.transfer.kind != "mooncake":
            raise ConfigError(
                f"a job of {len(self.cluster.nodes)} nodes moves weights between them with Mooncake: set "
                "transfer=mooncake (cluster=local2 does)"
            )
        self._check_task_against(rollout)
        return self

    def _check_task_against(self, rollout: RolloutConfig) -> None:
        if self.task.answers_span_lines and "\n" in rollout.stop:
            raise ConfigError(
                f"task.name={self.task.name!r} answers span lines (worked steps or a program), so "
                f"rollout.stop={rollout.stop!r} would cut each at its first line: set rollout.stop='' (a response "
                "ends at the tokenizer's end-of-sequence token)"
            )
        if self.task.pool_size < rollout.prompts_per_iteration:
            raise ConfigError(
                f"task.pool_size ({self.task.pool_size}) must be >= rollout.prompts_per_iteration "
                f"({rollout.prompts_per_iteration})"
            )

    def _check_long_context(self) -> None:
        """With a preset, its lengths are what runs: rollout's must be left at the defaults or agree."""
        for name, value in self.long_context.rollout_lengths().items():
            given, default = getattr(self.rollout, name), RolloutConfig.model_fields[name].default
            if given not in (default, value):
                raise ConfigError(
                    f"rollout.{name}={given} conflicts with long_context.preset={self.long_context.preset!r}, "
                    f"which sets it to {value} (long_context.{name}); leave rollout.{name} at its default "
                    f"({default}) or change long_context.{name}"
                )

    def effective_rollout(self) -> RolloutConfig:
        """The rollout section that runs: `rollout` with the long-context preset's lengths applied, checked."""
        lengths = self.long_context.rollout_lengths()
        rollout = self.rollout.model_copy(update=lengths) if lengths else self.rollout
        try:
            rollout.check_lengths()
        except ConfigError as e:
            if not lengths:
                raise
            raise ConfigError(f"with long_context.preset={self.long_context.preset!r}: {e}") from e
        return rollout

    def vllm_settings(
        self, model_dir: Path, *, port: int, host: str = "127.0.0.1", load_format: LoadFormat = "dummy"
    ) -> VllmSettings:
        """How this run starts vLLM on `model_dir` (the sidecar's, or one built in-process, whose port is unused)."""
        rollout = self.effective_rollout()
        return VllmSettings(
            model_dir=str(model_dir),
            host=host,
            port=port,
            tensor_parallel=self.parallel.vllm_tp,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            kv_cache_bytes=rollout.kv_cache_bytes(),
            max_model_len=rollout.max_model_len,
            dtype=self.model.dtype,
            seed=self.run.seed,
            load_format=load_format,
            sleep_mode=rollout.sleep_level > 0,
        )

    def local_region(self, has_cuda: bool) -> Literal["shm", "cuda_ipc"]:
        """transfer.local as the node runs it (the launcher tells the engine and the ranks): auto is cuda_ipc on a
        machine with CUDA where one vLLM worker reads the export and no other node pulls it, else shm."""
        if self.transfer.local == "auto":
            one_reader = self.transfer.kind == "shm" and self.parallel.vllm_tp == 1
            return "cuda_ipc" if has_cuda and one_reader else "shm"
        return self.transfer.local

    def check_machine(self, has_cuda: bool, cpu_bfloat16: bool) -> None:
        """Rules that depend on the machine the run starts on (`cpu_bfloat16`: its CPU computes in
        bfloat16 natively, AVX512-BF16 or AMX, as oneDNN reports)."""
        rollout = self.effective_rollout()
        if rollout.sleep_level and not has_cuda:
            raise ConfigError(
                f"rollout.sleep_level={rollout.sleep_level} needs a CUDA device (vLLM's sleep mode is its CUDA "
                "memory allocator) and this machine has none; use 0, which keeps vLLM resident"
            )
        if self.transfer.local == "cuda_ipc" and not has_cuda:
            raise ConfigError(
                "transfer.local='cuda_ipc' shares the export in GPU memory and this machine has no CUDA device; "
                "use 'shm' or 'auto' (shared memory here)"
            )
        if self.model.dtype == "bfloat16" and not (has_cuda or cpu_bfloat16):
            raise ConfigError(
                "model.dtype='bfloat16' needs a CUDA device or a CPU with native bfloat16 (AVX512-BF16 or AMX) "
                "and this machine has neither; use float32"
            )
