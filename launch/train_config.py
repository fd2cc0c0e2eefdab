"""The run's configuration: Hydra composes `conf/`, these frozen dataclasses validate it and run.

Consumes: Hydra overrides (`algo=grpo rollout.group_size=4`) and the YAML groups under `conf/`.
Produces: one `TrainConfig`, built once at start-up; each component receives its own section
(`cfg.effective_rollout()`, `cfg.algo.to_algo()`, `cfg.model`, ...), never raw keys.
Every rule lives in a `__post_init__` and reports with the full key and what is allowed; nothing
is silently rewritten, and an unknown (misspelt) key is an error listing the keys of its section.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NoReturn, TypeVar, Union, get_args, get_origin, get_type_hints

from checkpoint_engine.etcd_client import parse_endpoint
from engine.tiny_model import ARCHS, VALID_HEAD_DIMS, Arch, TinyModelSpec

if TYPE_CHECKING:
    import omegaconf

    from engine.algorithms import AlgoConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

Dtype = Literal["float32", "bfloat16"]
TaskName = Literal["addition", "sort", "jsonl"]
TaskReward = Literal["exact", "partial"]
OfferedAlgo = Literal["kimi", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
KlEstimator = Literal["k1", "k2", "k3"]
Lifecycle = Literal["terminate", "keep_alive"]
Staleness = Literal["exclude", "keep"]
TransferKind = Literal["shm", "mooncake"]
Protocol = Literal["tcp", "rdma"]
Device = Literal["cpu", "cuda"]
Preset = Literal["none", "32k", "128k"]
Launcher = Literal["local", "torchrun", "slurm"]

# engine.algorithms implements PPO's losses, but the trainer has no value head to feed them.
NOT_OFFERED = {"ppo": "ppo needs a critic (a value head), which the trainer does not wire yet"}
# The lengths a long-context preset decides for the rollout, and the context each preset names.
LENGTH_KEYS = ("max_model_len", "max_response_tokens", "iteration_token_budget")
PRESET_MAX_MODEL_LEN = {"32k": 32768, "128k": 131072}
# The tasks' own limits (engine/tasks): addition operands have <= 9 digits, sorted lists <= 32 items.
MAX_DIGITS = {"addition": 9, "sort": 32}


class ConfigError(ValueError):
    """A configuration that cannot run as written; the message names the full key and what is allowed."""


def _fail(message: str) -> NoReturn:
    raise ConfigError(message)


def _join(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ---------------------------------------------------------------- runtime type checks


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _describe(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return "a list of strings"
    if is_dataclass(hint):
        return f"a {hint.__name__} mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _coerce(key: str, hint: Any, value: Any, *, nullable: bool = False) -> Any:
    """`value` checked against the field's type, int -> float and list -> tuple; else ConfigError naming `key`."""
    origin, args = get_origin(hint), get_args(hint)
    or_null = " or null" if nullable else ""
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(key, inner, value, nullable=True)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        _fail(f"{key} must be one of {list(args)}{or_null}, got {value!r}")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is float and is_number:
        if not math.isfinite(value):
            _fail(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(_coerce(f"{key}[{i}]", args[0], item) for i, item in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, is_dataclass(hint) and isinstance(value, hint))
    if ok:
        return value
    message = f"{key} must be {_describe(hint)}{or_null}, got {value!r} ({type(value).__name__})"
    if hint is str and isinstance(value, int | float | bool):
        # Hydra reads `run.name=123` as an int; converting back could lose text such as "0123".
        message += f"; Hydra parsed it as {type(value).__name__}, quote it: '{key}=\"{value}\"'"
    _fail(message)


def _reject_unknown(data: Mapping[Any, Any], names: list[str], prefix: str) -> None:
    unknown = [k for k in data if k not in names]
    if not unknown:
        return
    guesses = [g for k in unknown for g in difflib.get_close_matches(str(k), names, n=1)]
    did_you_mean = f" (did you mean {guesses}?)" if guesses else ""
    where = f"of {prefix}" if prefix else "at the top level"
    _fail(f"unknown key(s) {[_join(prefix, k) for k in unknown]}{did_you_mean}; valid keys {where}: {names}")


S = TypeVar("S", bound="_Section")


class _Section:
    """Shared by every section: its key in the tree, the runtime type check and the dict build."""

    KEY: ClassVar[str]

    def _check_fields(self) -> None:
        """Dataclasses do not check types or Literal values at runtime; do it once, here."""
        hints = _hints(type(self))
        for f in fields(self):
            value = _coerce(_join(self.KEY, f.name), hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    def _key(self, name: str) -> str:
        return _join(self.KEY, name)

    def _at_least(self, name: str, low: float) -> None:
        value = getattr(self, name)
        if not value >= low:
            _fail(f"{self._key(name)} must be >= {low}, got {value}")

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if not value > 0:
            _fail(f"{self._key(name)} must be > 0, got {value}")

    @classmethod
    def _build(cls: type[S], data: object) -> S:
        """Construct from a mapping: unknown keys are errors, missing keys take the defaults."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping):
            _fail(f"{cls.KEY or 'the configuration'} must be a mapping with keys {names}, got {data!r}")
        _reject_unknown(data, names, cls.KEY)
        hints = _hints(cls)
        kwargs = {}
        for name, value in data.items():
            hint = hints[name]
            nested = isinstance(hint, type) and issubclass(hint, _Section) and isinstance(value, Mapping)
            kwargs[name] = hint._build(value) if nested else value
        return cls(**kwargs)

    def _as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value = value._as_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig(_Section):
    KEY: ClassVar[str] = "run"
    name: str = "addition-kimi"
    root: str = "runs"  # run directories go under it
    seed: int = 0
    iterations: int = 12
    eval_every: int = 3  # held-out eval every N iterations, plus at iteration 0 and the last
    checkpoint_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_fields()
        if not self.name or "/" in self.name:
            _fail(f"run.name must be a non-empty name without '/', got {self.name!r}")
        self._at_least("seed", 0)
        for name in ("iterations", "eval_every", "checkpoint_every"):
            self._at_least(name, 1)


@dataclass(frozen=True)
class ModelConfig(_Section):
    KEY: ClassVar[str] = "model"
    TINY_FIELDS: ClassVar[tuple[str, ...]] = (
        "arch", "layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions", "tie_embeddings",
    )  # fmt: skip
    path: str | None = None  # an HF model directory; None: write the tiny model described below
    arch: Arch = "llama"
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 256
    tie_embeddings: bool = False
    dtype: Dtype = "float32"

    def __post_init__(self) -> None:
        self._check_fields()
        if self.path is not None:
            # The tiny fields describe a model we write; an HF checkpoint brings its own config.json.
            changed = [n for n in self.TINY_FIELDS if getattr(self, n) != _default(ModelConfig, n)]
            if changed:
                _fail(
                    f"{[self._key(n) for n in changed]} describe the tiny model and cannot take effect with "
                    f"model.path={self.path!r}; leave them at their defaults or set model.path=null"
                )
            return
        if self.arch not in ARCHS:  # the Literal and engine.tiny_model must agree
            _fail(f"model.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions"):
            self._at_least(name, 1)
        if self.hidden % self.heads:
            _fail(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        if self.heads % self.kv_heads:
            _fail(f"model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if self.hidden // self.heads not in VALID_HEAD_DIMS:
            _fail(
                f"model.hidden / model.heads = {self.hidden // self.heads} must be one of {list(VALID_HEAD_DIMS)} "
                "(vLLM's CPU attention rejects other head sizes, 16 included)"
            )

    def tiny_spec(self, seed: int = 0) -> TinyModelSpec:
        """What `engine.tiny_model.write_tiny_model` needs to write this model (model.path is None)."""
        if self.path is not None:
            _fail(f"model.path={self.path!r} is set: there is no tiny model to write")
        return TinyModelSpec(**{n: getattr(self, n) for n in self.TINY_FIELDS}, seed=seed)


@dataclass(frozen=True)
class TaskConfig(_Section):
    KEY: ClassVar[str] = "task"
    name: TaskName = "addition"
    path: str | None = None  # JSONL records for task jsonl; must be null otherwise
    pool_size: int = 8000  # RL prompt pool (the cold start draws its tenth from it)
    heldout_size: int = 128
    digits: int = 2  # addition: max digits of each operand; sort: list length
    reward: TaskReward = "partial"  # partial: credit per right digit / position (addition, sort); correct stays exact

    def __post_init__(self) -> None:
        self._check_fields()
        if self.name == "jsonl" and self.reward != "exact":
            _fail(f"task.reward={self.reward!r} applies to addition and sort; jsonl answers are verified exactly")
        if self.name == "jsonl" and self.path is None:
            _fail("task.path is required for task.name='jsonl' (a JSONL file of prompt/answer records)")
        if self.name != "jsonl" and self.path is not None:
            _fail(f"task.path applies only to task.name='jsonl', not {self.name!r}; set task.path=null")
        for name in ("pool_size", "heldout_size", "digits"):
            self._at_least(name, 1)
        limit = MAX_DIGITS.get(self.name)
        if limit is not None and self.digits > limit:
            _fail(f"task.digits must be in [1, {limit}] for task.name={self.name!r}, got {self.digits}")


@dataclass(frozen=True)
class AlgoSection(_Section):
    KEY: ClassVar[str] = "algo"
    name: OfferedAlgo = "kimi"
    tau: float = 0.1  # kimi: weight of the squared log-ratio to the iteration's starting policy
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: KlEstimator = "k3"
    aggregation: str | None = None  # None: the algorithm's own (engine.algorithms.config.NATURAL_AGGREGATION)

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and self.name in NOT_OFFERED:
            _fail(f"algo.name={self.name!r} is not offered: {NOT_OFFERED[self.name]}; choose one of {_options()}")
        self._check_fields()
        if self.kl_coef < 0:
            _fail(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.name == "kimi" and self.kl_coef > 0:
            _fail(
                "algo.kl_coef cannot take effect with algo.name='kimi' (its loss has no KL term; tau plays that role)"
            )
        self.to_algo()

    def to_algo(self, norm_tokens: float = 1.0) -> AlgoConfig:
        """The engine's algorithm config; `norm_tokens` is the seq_sum divisor (Dr.GRPO: the generation budget)."""
        from engine.algorithms import AlgoConfig

        try:
            return AlgoConfig(
                name=self.name,
                tau=self.tau,
                clip_low=self.clip_low,
                clip_high=self.clip_high,
                kl_coef=self.kl_coef,
                kl_estimator=self.kl_estimator,
                aggregation=self.aggregation,  # AlgoConfig checks the value
                norm_tokens=norm_tokens,
            )
        except ValueError as e:  # its messages already name algo.<key>
            raise ConfigError(str(e)) from e


def _options() -> list[str]:
    return list(get_args(OfferedAlgo))


@dataclass(frozen=True)
class ColdStartConfig(_Section):
    KEY: ClassVar[str] = "trainer.cold_start"
    fraction: float = 0.1  # share of task.pool_size used for supervised cold start; at most a tenth
    epochs: int = 100
    lr: float = 3e-3
    batch_size: int = 32

    def __post_init__(self) -> None:
        self._check_fields()
        if not 0 <= self.fraction <= 0.1:
            _fail(f"trainer.cold_start.fraction must be in [0, 0.1] (at most a tenth of the pool), got {self.fraction}")
        self._at_least("epochs", 1)
        self._positive("lr")
        self._at_least("batch_size", 1)


@dataclass(frozen=True)
class TrainerSection(_Section):
    KEY: ClassVar[str] = "trainer"
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iterations: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_groups: int = 32  # groups per micro-batch
    updates_per_batch: int = 2  # optimizer steps per rollout batch
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)

    def __post_init__(self) -> None:
        self._check_fields()
        self._positive("lr")
        if not 0 <= self.min_lr <= self.lr:
            _fail(f"trainer.min_lr must be in [0, trainer.lr={self.lr}], got {self.min_lr}")
        self._at_least("warmup_iterations", 0)
        self._at_least("weight_decay", 0)
        self._positive("grad_clip")
        self._at_least("micro_batch_groups", 1)
        self._at_least("updates_per_batch", 1)


@dataclass(frozen=True)
class RolloutSection(_Section):
    """Sampling and the rollout engine. The three lengths are checked together on what runs:
    `TrainConfig.effective_rollout()`, since a long-context preset replaces them."""

    KEY: ClassVar[str] = "rollout"
    lifecycle: Lifecycle = "terminate"
    group_size: int = 8
    prompts_per_iteration: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_tokens: int = 16
    iteration_token_budget: int = 16
    partial: bool = True
    staleness: Staleness = "exclude"
    eval_samples: int = 4
    gpu_memory_utilization: float = 0.08
    max_model_len: int = 256
    stop: str = "\n"

    def __post_init__(self) -> None:
        self._check_fields()
        if self.lifecycle == "keep_alive":
            _fail("rollout.lifecycle='keep_alive' is not built yet; terminate is the tested default")
        self._at_least("group_size", 2)
        self._at_least("prompts_per_iteration", 1)
        self._positive("temperature")
        if not 0 < self.top_p <= 1:
            _fail(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_response_tokens", "iteration_token_budget", "eval_samples", "max_model_len"):
            self._at_least(name, 1)
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def check_rollout_lengths(r: RolloutSection) -> None:
    """budget <= max_response_tokens < max_model_len, and without partial rollouts budget == max."""
    if r.iteration_token_budget > r.max_response_tokens:
        _fail(
            f"rollout.iteration_token_budget ({r.iteration_token_budget}) must be in "
            f"[1, rollout.max_response_tokens={r.max_response_tokens}]"
        )
    if r.max_response_tokens >= r.max_model_len:
        _fail(
            f"rollout.max_response_tokens ({r.max_response_tokens}) must be < rollout.max_model_len "
            f"({r.max_model_len}): the prompt needs room too"
        )
    if not r.partial and r.iteration_token_budget != r.max_response_tokens:
        _fail(
            f"rollout.partial=false needs rollout.iteration_token_budget == rollout.max_response_tokens "
            f"(nothing is continued, so a smaller budget would cut every response short), "
            f"got {r.iteration_token_budget} and {r.max_response_tokens}"
        )


@dataclass(frozen=True)
class TransferSection(_Section):
    KEY: ClassVar[str] = "transfer"
    kind: TransferKind = "shm"
    protocol: Protocol = "tcp"  # Mooncake's transport between nodes

    def __post_init__(self) -> None:
        self._check_fields()
        if self.kind == "shm" and self.protocol != "tcp":
            _fail(f"transfer.protocol={self.protocol!r} applies to transfer.kind='mooncake' only; leave it at 'tcp'")


@dataclass(frozen=True)
class ParallelSection(_Section):
    KEY: ClassVar[str] = "parallel"
    device: Device = "cpu"
    trainer_tp: int = 1
    trainer_pp: int = 1
    trainer_dp: int = 1
    vllm_tp: int = 1

    def __post_init__(self) -> None:
        self._check_fields()
        for name in ("trainer_tp", "trainer_pp", "trainer_dp", "vllm_tp"):
            self._at_least(name, 1)
        if self.trainer_pp != 1:
            _fail(
                f"parallel.trainer_pp={self.trainer_pp}: pipeline parallel trainer is not supported "
                "(CPU pipeline schedules need CUDA); set it to 1"
            )

    @property
    def trainer_ranks(self) -> int:
        return self.trainer_tp * self.trainer_pp * self.trainer_dp


@dataclass(frozen=True)
class PhaseSection(_Section):
    KEY: ClassVar[str] = "phase"
    timeout: float = 900.0  # seconds a barrier waits
    vllm_start_timeout: float = 300.0
    terminate_grace: float = 3.0  # seconds between SIGTERM and SIGKILL
    ttl: int = 10  # node lease seconds

    def __post_init__(self) -> None:
        self._check_fields()
        for name in ("timeout", "vllm_start_timeout", "terminate_grace"):
            self._positive(name)
        self._at_least("ttl", 2)
        if self.vllm_start_timeout > self.timeout:
            _fail(
                f"phase.vllm_start_timeout ({self.vllm_start_timeout}) must be <= phase.timeout ({self.timeout}): "
                "the START_VLLM barrier would give up first"
            )


@dataclass(frozen=True)
class LongContextSection(_Section):
    KEY: ClassVar[str] = "long_context"
    preset: Preset = "none"
    max_model_len: int | None = None
    max_response_tokens: int | None = None
    iteration_token_budget: int | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        self._check_fields()
        given = [n for n in LENGTH_KEYS if getattr(self, n) is not None]
        if self.preset == "none":
            if given:
                _fail(
                    f"{[self._key(n) for n in given]} apply only with a long_context.preset; "
                    "leave them null and set rollout.* instead"
                )
            return
        missing = [self._key(n) for n in LENGTH_KEYS if n not in given]
        if missing:
            _fail(f"long_context.preset={self.preset!r} needs {missing} set")
        if self.max_model_len != PRESET_MAX_MODEL_LEN[self.preset]:
            _fail(
                f"long_context.max_model_len must be {PRESET_MAX_MODEL_LEN[self.preset]} for "
                f"long_context.preset={self.preset!r}, got {self.max_model_len}"
            )

    def rollout_lengths(self) -> dict[str, int]:
        """The rollout lengths this preset decides ({} for none)."""
        if self.preset == "none":
            return {}
        return {n: getattr(self, n) for n in LENGTH_KEYS}


@dataclass(frozen=True)
class ClusterSection(_Section):
    KEY: ClassVar[str] = "cluster"
    etcd: str | None = None  # HOST:PORT; None: the launcher starts a local etcd
    nodes: tuple[str, ...] = ("node0",)
    node: str = "node0"  # this process's node; must be one of nodes
    launcher: Launcher = "local"
    engine_port: int = 0  # 0: pick a free one
    vllm_port: int = 0

    def __post_init__(self) -> None:
        self._check_fields()
        if self.etcd is not None:
            try:
                parse_endpoint(self.etcd)
            except ValueError as e:
                raise ConfigError(f"cluster.etcd: {e}") from e
        if not self.nodes or len(set(self.nodes)) != len(self.nodes) or "" in self.nodes:
            _fail(f"cluster.nodes must be a non-empty list of distinct, non-empty names, got {list(self.nodes)}")
        if self.node not in self.nodes:
            _fail(f"cluster.node must be one of cluster.nodes {list(self.nodes)}, got {self.node!r}")
        for name in ("engine_port", "vllm_port"):
            if not 0 <= getattr(self, name) <= 65535:
                _fail(f"cluster.{name} must be in [0, 65535] (0: pick a free one), got {getattr(self, name)}")
        if self.engine_port and self.engine_port == self.vllm_port:
            _fail(f"cluster.engine_port and cluster.vllm_port must differ, both are {self.engine_port}")


# ---------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The whole run, validated across sections; components take their own section from it."""

    KEY: ClassVar[str] = ""
    run: RunConfig = field(default_factory=RunConfig)
    resume: str | None = None  # a run directory to resume
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoSection = field(default_factory=AlgoSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    phase: PhaseSection = field(default_factory=PhaseSection)
    long_context: LongContextSection = field(default_factory=LongContextSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def __post_init__(self) -> None:
        self._check_fields()
        if self.model.dtype == "bfloat16" and self.parallel.device == "cpu":
            _fail("model.dtype='bfloat16' is not supported with parallel.device='cpu'; use model.dtype='float32'")
        if self.model.path is None:
            self._check_heads()
        self._check_long_context()
        rollout = self.effective_rollout()
        if self.model.path is None and rollout.max_model_len > self.model.max_positions:
            source = (
                f"long_context.preset={self.long_context.preset!r} sets max_model_len {rollout.max_model_len}"
                if self.long_context.preset != "none"
                else f"rollout.max_model_len is {rollout.max_model_len}"
            )
            _fail(
                f"{source} but model.max_positions is {self.model.max_positions} (the tiny model's context); "
                f"set model.max_positions >= {rollout.max_model_len} or a shorter context"
            )
        if self.task.pool_size < rollout.prompts_per_iteration:
            _fail(
                f"task.pool_size ({self.task.pool_size}) must be >= rollout.prompts_per_iteration "
                f"({rollout.prompts_per_iteration})"
            )

    def _check_heads(self) -> None:
        for heads in ("heads", "kv_heads"):
            for tp in ("trainer_tp", "vllm_tp"):
                n, size = getattr(self.model, heads), getattr(self.parallel, tp)
                if n % size:
                    _fail(f"model.{heads} ({n}) must be divisible by parallel.{tp} ({size})")

    def _check_long_context(self) -> None:
        """With a preset, its lengths are what runs: rollout's must be left at the defaults or agree."""
        for name, value in self.long_context.rollout_lengths().items():
            given, default = getattr(self.rollout, name), _default(RolloutSection, name)
            if given not in (default, value):
                _fail(
                    f"rollout.{name}={given} conflicts with long_context.preset={self.long_context.preset!r}, "
                    f"which sets it to {value} (long_context.{name}); leave rollout.{name} at its default "
                    f"({default}) or change long_context.{name}"
                )

    def effective_rollout(self) -> RolloutSection:
        """The rollout section that runs: `rollout` with the long-context preset's lengths applied, checked."""
        lengths = self.long_context.rollout_lengths()
        rollout = replace(self.rollout, **lengths) if lengths else self.rollout
        try:
            check_rollout_lengths(rollout)
        except ConfigError as e:
            if not lengths:
                raise
            raise ConfigError(f"with long_context.preset={self.long_context.preset!r}: {e}") from e
        return rollout

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a composed config (DictConfig or plain mapping); missing keys take the defaults."""
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(d, DictConfig):
            try:
                d = OmegaConf.to_container(d, resolve=True)
            except OmegaConfBaseException as e:
                raise ConfigError(f"cannot resolve the configuration: {e}") from e
        return cls._build(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; `TrainConfig.from_dict(cfg.to_dict()) == cfg`."""
        return self._as_dict()


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


# ---------------------------------------------------------------- Hydra


def compose(overrides: list[str], config_dir: Path | None = None) -> omegaconf.DictConfig:
    """Compose `config.yaml` of `config_dir` (default: the repository's conf/) with Hydra overrides."""
    import hydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    conf = (config_dir or CONF_DIR).resolve()
    try:
        with hydra.initialize_config_dir(version_base=None, config_dir=str(conf)):
            return hydra.compose("config", overrides=list(overrides))
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse override {_bad_override(overrides)!r}: {e}") from e
    except MissingConfigException as e:
        raise ConfigError(_missing_option_message(e, conf)) from e
    except (HydraException, OmegaConfBaseException) as e:
        match = re.match(r"Could not override '([^']+)'", str(e))
        if match:
            _check_key_path(match.group(1))  # a misspelt key: name it with the valid keys
        raise ConfigError(f"cannot compose the configuration with {overrides}: {e}") from e


def load_config(overrides: list[str], config_dir: Path | None = None) -> TrainConfig:
    """Compose and convert, once, at start-up."""
    return TrainConfig.from_dict(compose(overrides, config_dir))


def _bad_override(overrides: list[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return " ".join(overrides)


def _missing_option_message(error: Exception, conf: Path) -> str:
    """Hydra's first line, then the options of the group from the files, and why an absent one is absent."""
    text = str(error)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if not match:
        return f"{text.split('Config search path', maxsplit=1)[0].strip()} (config dir {conf})"
    group, option = match.groups()
    options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
    message = f"{text.splitlines()[0]}; available options of {group}: {options}"
    if group == "algo" and option in NOT_OFFERED:
        message += f" ({NOT_OFFERED[option]})"
    return message


def _check_key_path(dotted: str) -> None:
    """Raise the unknown-key error for `dotted` (e.g. rollout.temprature) if the schema lacks it."""
    cls: type = TrainConfig
    prefix = ""
    for part in dotted.split("."):
        names = [f.name for f in fields(cls)]
        _reject_unknown({part: None}, names, prefix)
        hint = _hints(cls)[part]
        prefix = _join(prefix, part)
        if not (isinstance(hint, type) and issubclass(hint, _Section)):
            return
        cls = hint
