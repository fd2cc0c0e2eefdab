"""The Hydra groups in conf/ compose over the sections' defaults, and the sections check what they get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from checkpoint_engine.contracts.config import ConfigError, Section
from engine.config import RolloutConfig
from launch.config_loading import CONF_DIR, compose, load_config, resumed_config, to_config
from launch.run_setup import check_kv_cache
from launch.train_config import TrainConfig

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
# What an option needs besides itself to form a valid run.
NEEDS = {
    ("task", "jsonl"): ["task.path=data/gsm8k.jsonl"],
    ("task", "gsm8k"): ["task.path=data/gsm8k.jsonl", "rollout.stop=''"],
    ("task", "math"): ["task.path=data/math.jsonl", "rollout.stop=''"],
    ("task", "code"): ["task.path=data/code.jsonl", "rollout.stop=''"],
    ("long_context", "32k"): ["model.max_positions=32768"],
    ("long_context", "128k"): ["model.max_positions=131072"],
}


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    return str(info.value)


def test_groups_are_the_documented_ones() -> None:
    assert GROUPS == [
        "algo",
        "cluster",
        "long_context",
        "model",
        "parallel",
        "phase",
        "reward",
        "rollout",
        "sampler",
        "task",
        "transfer",
    ]


def test_defaults_compose_to_the_sections_defaults() -> None:
    cfg = load_config([])
    assert cfg == TrainConfig()
    assert cfg.run.name == "scratchpad-kimi"
    assert cfg.effective_rollout() == cfg.rollout
    assert cfg.parallel.trainer_ranks == 1
    assert cfg.algo.to_algo().name == "kimi"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    composed = compose(overrides)
    cfg = to_config(composed)
    section = getattr(cfg, group)
    # The sections' defaults bring every key, so each can be overridden by name; the file sets its own.
    assert set(composed[group]) == set(type(section).model_fields)
    stated = (CONF_DIR / group / f"{option}.yaml").read_text()
    for key, value in composed[group].items():
        if f"\n{key}:" in f"\n{stated}" and key != "path":
            actual = getattr(section, key)
            actual = actual.to_dict() if isinstance(actual, Section) else actual  # a nested section
            assert actual == (tuple(value) if isinstance(value, list | tuple) else value)


def test_round_trip_through_json() -> None:
    cluster = [
        "cluster.nodes=[a,b]",
        "cluster.node=b",
        "cluster.job=j",
        "cluster.trainer_port=7",
        "cluster.etcd_port=8",
    ]
    cfg = load_config(["algo=grpo", "task=sort", "parallel=tp2", "transfer=mooncake", *cluster])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(data) == cfg
    assert cfg.cluster.nodes == ("a", "b")
    assert cfg.run.name == "sort-grpo"


def test_from_dict_fills_missing_keys_with_defaults_and_converts_ints_to_floats() -> None:
    cfg = TrainConfig.from_dict({"rollout": {"temperature": 1, "group_size": 4}})
    assert cfg.rollout.temperature == 1.0
    assert isinstance(cfg.rollout.temperature, float)
    assert cfg.rollout.group_size == 4
    assert cfg.trainer == TrainConfig().trainer


@pytest.mark.parametrize("override", ["rollout.temprature=0.5", "+rollout.temprature=0.5"])
def test_misspelt_override_names_the_key_and_the_valid_keys(override: str) -> None:
    message = _error([override])
    assert "rollout.temprature" in message
    assert "temperature" in message
    assert "max_response_tokens" in message  # the list of valid keys of rollout


def test_misspelt_key_in_from_dict() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.cold_start\.epoch'.*valid keys of trainer\.cold_start"):
        TrainConfig.from_dict({"trainer": {"cold_start": {"epoch": 2}}})
    with pytest.raises(ConfigError, match="valid keys at the top level"):
        TrainConfig.from_dict({"rollouts": {}})


def test_unknown_group_option_lists_the_options() -> None:
    message = _error(["algo=a2c"])
    assert "kimi" in message
    assert "ppo" in message
    assert load_config(["algo=ppo"]).algo.name == "ppo"


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"cannot parse override 'run\.name=\[1,'"):
        compose(["rollout.group_size=4", "run.name=[1,"])


def test_bad_literal() -> None:
    assert _error(["rollout.staleness=x"]) == "rollout.staleness must be one of ['exclude', 'keep'], got 'x'"
    assert _error(["task.name=x"]) == (
        "task.name must be one of ['scratchpad', 'addition', 'sort', 'jsonl', 'gsm8k', 'math', 'code'], got 'x'"
    )


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("rollout.group_size=8.0", r"rollout\.group_size must be an integer, got 8\.0"),
        ("rollout.group_size=abc", r"rollout\.group_size must be an integer, got 'abc'"),
        ("run.progress=yes", r"run\.progress must be true or false"),
        ("run.progress=1", r"run\.progress must be true or false"),
        ("run.name=123", r"run\.name must be a string.*quote it"),
        ("rollout.temperature=nan", r"rollout\.temperature must be a finite number"),
    ],
)
def test_wrong_types_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config([override])


RULES = [
    (["rollout.iteration_token_budget=80"], r"rollout\.iteration_token_budget \(80\) must be in \[1, "),
    (["rollout.max_response_tokens=300", "rollout.iteration_token_budget=8"], r"must be < rollout\.max_model_len"),
    (["rollout.max_model_len=512"], r"rollout\.max_model_len is 512 but model\.max_positions is 256"),
    (["task=jsonl"], r"task\.path is required"),
    (["task=math"], r"task\.path is required for task\.name='math' \(a JSONL file of records with fields 'problem'"),
    (["task=gsm8k", "task.path=x.jsonl"], r"task\.name='gsm8k' answers span lines .* set rollout\.stop=''"),
    (
        ["task=code"],
        r"task\.path is required for task\.name='code' \(a JSONL file of records with fields 'prompt' and 'tests'",
    ),
    (["task=code", "task.path=x.jsonl"], r"task\.name='code' answers span lines \(worked steps or a program\)"),
    (["task.sandbox.seconds=2"], r"task\.sandbox applies only to task\.name='code', not 'scratchpad'"),
    (
        ["task.path=x.jsonl"],
        r"task\.path applies only to task\.name in \['code', 'gsm8k', 'jsonl', 'math'\], not 'scratch",
    ),
    (["parallel.trainer_tp=4"], r"model\.kv_heads \(2\) must be divisible by parallel\.trainer_tp \(4\)"),
    (["parallel.vllm_tp=4"], r"model\.kv_heads.*parallel\.vllm_tp"),
    (["parallel.trainer_pp=2"], r"pipeline parallel trainer is not supported"),
    (["parallel.trainer_dp=2", "parallel.trainer_ep=2"], r"model\.arch=llama is dense \(use model\.arch=qwen3_moe\)"),
    (["parallel.trainer_dp=3", "parallel.trainer_ep=2"], r"parallel\.trainer_ep=2 must divide parallel\.trainer_dp=3"),
    (
        ["parallel.trainer_tp=2", "parallel.trainer_ep=2", "parallel.trainer_dp=2"],
        r"an MoE trainer runs at trainer_tp=1",
    ),
    (
        ["model.arch=qwen3_moe", "model.experts=3", "parallel.trainer_dp=2", "parallel.trainer_ep=2"],
        r"model\.experts \(3\) must be divisible by parallel\.trainer_ep \(2\)",
    ),
    (["model.experts=8"], r"\['model\.experts'\] apply to model\.arch=qwen3_moe, not llama"),
    (
        ["model.arch=qwen3_moe", "model.experts_per_token=5"],
        r"model\.experts_per_token \(5\) must be at most model\.experts \(4\)",
    ),
    (["trainer.cold_start.fraction=0.2"], r"trainer\.cold_start\.fraction must be in \[0, 0\.1\]"),
    (["trainer.min_lr=1.0"], r"trainer\.min_lr must be in \[0, "),
    (["model.heads=8"], r"model\.hidden / model\.heads = 16 must be one of \[32, 64, 128\]"),
    (["model.path=/models/qwen", "model.layers=3"], r"model\.layers.*cannot take effect"),
    (["algo.kl_coef=0.1"], r"algo\.kl_coef cannot take effect with algo\.name='kimi'"),
    (["algo=grpo", "algo.aggregation=mean"], r"algo\.aggregation must be one of"),
    (["algo=grpo", "algo.clip_high=1.5"], r"algo\.clip_high must be in \[0, 1\)"),
    (["transfer.protocol=rdma"], r"transfer\.protocol='rdma' applies to transfer\.kind='mooncake'"),
    (["cluster.node=node1"], r"cluster\.node must be one of cluster\.nodes"),
    (["cluster.etcd=http://127.0.0.1:2379"], r"cluster\.etcd: bad etcd endpoint"),
    (["cluster.attempt=slurm/7"], r"bad cluster\.attempt 'slurm/7'"),
    (["phase.ttl=1"], r"phase\.ttl must be >= 2"),
    (
        ["cluster.nodes=[a,b]", "cluster.node=a"],
        r"needs cluster\.job, cluster\.trainer_port, cluster\.etcd \(or etcd_port\)",
    ),
    (
        ["cluster.nodes=[a,b]", "cluster.node=a", "cluster.job=j", "cluster.trainer_port=7", "cluster.etcd_port=8"],
        r"a job of 2 nodes moves weights between them with Mooncake: set transfer=mooncake",
    ),
    (
        ["cluster=local2", "cluster.nodes=[a,b,c]", "cluster.node=a"],
        r"cluster\.local_nodes starts one node beside the head",
    ),
    (["task.pool_size=8"], r"task\.pool_size \(8\) must be >= rollout\.prompts_per_iteration"),
    (["cluster.vllm_zygote=shared/vllm"], r"cluster\.vllm_zygote must be an absolute path.*'shared/vllm'"),
    (["cluster=local2", "cluster.vllm_zygote=/shared/vllm"], r"cluster\.vllm_zygote serves one node"),
    (["run.mode=train_only"], r"run\.mode=train_only needs run\.batches_from"),
    (["run.batches_from=runs/x"], r"run\.batches_from applies to run\.mode=train_only only; got run\.mode='rl'"),
    (["run.mode=train"], r"run\.mode must be one of \['rl', 'rollout_only', 'train_only'\], got 'train'"),
]


@pytest.mark.parametrize(("overrides", "pattern"), RULES, ids=[" ".join(o) for o, _ in RULES])
def test_rules_report_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides)


def test_heads_are_checked_against_both_tensor_parallel_sizes() -> None:
    assert load_config(["parallel=tp2", "parallel.vllm_tp=2"]).parallel.trainer_ranks == 2


def test_long_context_needs_a_model_that_long() -> None:
    message = _error(["long_context=32k"])
    assert "long_context.preset='32k'" in message
    assert "model.max_positions" in message


def test_long_context_preset_sets_the_effective_rollout() -> None:
    cfg = load_config(["long_context=32k", "model.max_positions=32768"])
    rollout = cfg.effective_rollout()
    assert (rollout.max_model_len, rollout.max_response_tokens, rollout.iteration_token_budget) == (32768, 30720, 8192)
    assert cfg.rollout == RolloutConfig()  # the section as written is kept; the preset applies on top


def test_long_context_accepts_rollout_values_equal_to_the_preset() -> None:
    cfg = load_config(["long_context=32k", "model.max_positions=32768", "rollout.max_response_tokens=30720"])
    assert cfg.effective_rollout().max_response_tokens == 30720


def test_long_context_conflicting_rollout_override_errors() -> None:
    message = _error(["long_context=32k", "model.max_positions=32768", "rollout.max_response_tokens=1024"])
    assert "rollout.max_response_tokens=1024 conflicts with long_context.preset='32k'" in message


def test_long_context_preset_lengths_are_checked_with_the_rollout() -> None:
    with pytest.raises(ConfigError, match=r"with long_context\.preset='128k': rollout\.iteration_token_budget"):
        load_config(["long_context=128k", "model.max_positions=131072", "long_context.iteration_token_budget=200000"])
    with pytest.raises(ConfigError, match=r"apply only with a long_context\.preset"):
        load_config(["long_context.max_model_len=4096"])


def test_compose_reads_another_config_dir(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("run:\n  name: elsewhere\n")
    cfg = to_config(compose([], config_dir=tmp_path))
    assert cfg.run.name == "elsewhere"
    assert cfg.rollout == RolloutConfig()


def test_sections_built_directly_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.staleness must be one of \['exclude', 'keep'\], got 'drop'"):
        RolloutConfig(staleness="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rollout\.group_size must be >= 2, got 1"):
        RolloutConfig(group_size=1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.max_response_tokens=0"], r"rollout\.max_response_tokens must be >= 1, got 0"),
        (["rollout.iteration_token_budget=-1"], r"rollout\.iteration_token_budget must be >= 1, got -1"),
        (["rollout.group_size=2.0"], r"rollout\.group_size"),
        (["rollout.iteration_token_budget=100"], r"iteration_token_budget \(100\) must be in \[1, rollout\.max_resp"),
        (["rollout.staleness=keep", "algo=grpo", "rollout.max_staleness=-1"], r"rollout\.max_staleness must be >= 0"),
        (["rollout.max_staleness=2"], r"rollout\.max_staleness only applies to rollout\.staleness=keep"),
    ],
)
def test_the_buffers_slice_of_rollout_is_checked_once_there(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides)


def test_max_staleness_reaches_the_buffers_slice() -> None:
    cfg = load_config(["rollout.staleness=keep", "algo=grpo", "rollout.max_staleness=1"])
    assert (cfg.rollout.buffer().staleness, cfg.rollout.buffer().max_staleness) == ("keep", 1)


def test_bfloat16_needs_a_cuda_device_or_a_cpu_with_native_bfloat16() -> None:
    cfg = load_config(["model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"model\.dtype='bfloat16' needs a CUDA device or a CPU with native"):
        cfg.check_machine(has_cuda=False, cpu_bfloat16=False)
    cfg.check_machine(has_cuda=True, cpu_bfloat16=False)
    cfg.check_machine(has_cuda=False, cpu_bfloat16=True)


def test_a_component_document_round_trips_through_its_file(tmp_path: Path) -> None:
    cfg = load_config(["algo=grpo", "trainer.lr=1e-4"])
    path = cfg.trainer.to_json_file(tmp_path / "trainer.json")
    assert type(cfg.trainer).from_json_file(path) == cfg.trainer
    path.write_text(path.read_text().replace('"weight_decay"', '"weight_decy"'))
    with pytest.raises(ConfigError, match=r"unknown key.*trainer\.weight_decy.*did you mean \['weight_decay'\]"):
        type(cfg.trainer).from_json_file(path)


def test_an_explicit_kv_cache_must_hold_one_whole_sequence(tmp_path: Path) -> None:
    # 2 layers x (K, V) x 2 heads x 32 dims x 4 bytes = 1 KiB per token, 1 GiB for 2**20 tokens.
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 128,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    long = {"max_model_len": 2**20 + 1, "max_response_tokens": 16, "iteration_token_budget": 16}
    with pytest.raises(ConfigError, match=r"rollout.kv_cache_gib=1.0 cannot hold .* \(1 GiB per vLLM worker\)"):
        check_kv_cache(RolloutConfig(kv_cache_gib=1.0, **long), tmp_path, "float32", vllm_tp=1)
    check_kv_cache(RolloutConfig(kv_cache_gib=1.0, **long), tmp_path, "bfloat16", vllm_tp=1)  # half the bytes
    check_kv_cache(RolloutConfig(kv_cache_gib=1.0, **long), tmp_path, "float32", vllm_tp=2)  # half the heads
    check_kv_cache(RolloutConfig(kv_cache_gib=None, **long), tmp_path, "float32", vllm_tp=1)  # vLLM sizes it


def test_kept_stale_tokens_need_a_per_token_loss() -> None:
    with pytest.raises(ConfigError, match=r"rollout.staleness='keep' .* kimi's per-sequence loss"):
        load_config(["rollout.staleness=keep"])
    assert load_config(["rollout.staleness=keep", "algo=grpo"]).rollout.staleness == "keep"


def test_a_repeat_penalty_needs_repeat_detection() -> None:
    with pytest.raises(ConfigError, match=r"reward.repeat_penalty=1.0 never applies .* rollout.repeat.enabled=true"):
        load_config(["reward.repeat_penalty=1.0"])
    cfg = load_config(["reward.repeat_penalty=1.0", "rollout.repeat.enabled=true", "rollout.repeat.max_ngram=4"])
    assert (cfg.rollout.repeat.max_ngram, cfg.rollout.repeat.min_repeats) == (4, 10)


def _resume(tmp_path: Path, saved: list[str], given: list[str]) -> TrainConfig:
    run = tmp_path / "job-1"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps(load_config(saved).to_dict()))
    overrides = [f"resume={run}", *given]
    return resumed_config(load_config(overrides), overrides, run / "config.json", run.name)


def test_a_resumed_run_takes_its_saved_config_and_refuses_other_values(tmp_path: Path) -> None:
    saved = ["task=addition", "run.iterations=5"]
    assert _resume(tmp_path, saved, []) == load_config(saved)
    assert _resume(tmp_path, saved, ["run.iterations=5", "task=addition"]) == load_config(saved)  # the same values
    with pytest.raises(ConfigError, match=r"only cluster\.\* may change; \['run.iterations=6'\] differ from it"):
        _resume(tmp_path, saved, ["run.iterations=6"])


def test_a_resumed_run_of_several_nodes_takes_a_new_placement_with_as_many_nodes(tmp_path: Path) -> None:
    saved = ["cluster=local2"]
    placed = [
        "transfer=mooncake",
        "cluster.nodes=[n3,n4]",
        "cluster.node=n4",
        "cluster.job=timeshare-9",
        "cluster.etcd=10.0.0.3:2379",
        "cluster.trainer_port=4000",
    ]
    cfg = _resume(tmp_path, saved, placed)
    assert (cfg.cluster.nodes, cfg.cluster.node, cfg.cluster.job) == (("n3", "n4"), "n4", "job-1")
    assert cfg.transfer.kind == "mooncake"
    assert cfg.model_copy(update={"cluster": load_config(saved).cluster}) == load_config(saved)
    with pytest.raises(ConfigError, match=r"the run has 2 nodes .* cluster\.nodes gives 3"):
        _resume(tmp_path, saved, [*placed, "cluster.nodes=[n3,n4,n5]"])


def _restated(data: dict, defaults: dict, prefix: str) -> list[str]:
    """The keys of `data` that equal their default (an option's `name` says which option it is, and stays)."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            found += _restated(value, defaults[key], f"{prefix}{key}.")
        elif key != "name" and key in defaults and defaults[key] == value:
            found.append(f"{prefix}{key}")
    return found


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_no_group_option_restates_a_default(group: str, option: str) -> None:
    text = (CONF_DIR / group / f"{option}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    defaults = TrainConfig().to_dict()
    sections = data if text.startswith("# @package _global_") else {group: data}
    restated = [k for section, values in sections.items() for k in _restated(values, defaults[section], f"{section}.")]
    assert restated == [], f"{group}/{option}.yaml restates the defaults of {restated}"


def test_the_last_iteration_always_checkpoints() -> None:
    run = load_config(["run.iterations=5", "run.checkpoint_every=2"]).run
    assert [i for i in range(1, 6) if run.checkpoints_at(i)] == [2, 4, 5]


def test_sleep_needs_keep_alive_and_a_cuda_device() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.sleep_level=1 .* needs rollout\.lifecycle=keep_alive"):
        load_config(["rollout.sleep_level=1"])
    cfg = load_config(["rollout.lifecycle=keep_alive", "rollout.sleep_level=2"])
    with pytest.raises(ConfigError, match=r"rollout\.sleep_level=2 needs a CUDA device"):
        cfg.check_machine(has_cuda=False, cpu_bfloat16=True)
    cfg.check_machine(has_cuda=True, cpu_bfloat16=False)
    settings = cfg.vllm_settings(Path("/m"), port=8000)
    assert settings.sleep_mode
    assert not load_config(["rollout.lifecycle=keep_alive"]).vllm_settings(Path("/m"), port=8000).sleep_mode


def test_cuda_ipc_needs_a_cuda_device_and_one_node() -> None:
    cfg = load_config(["transfer.local=cuda_ipc"])
    with pytest.raises(ConfigError, match=r"transfer\.local='cuda_ipc' shares the export in GPU memory"):
        cfg.check_machine(has_cuda=False, cpu_bfloat16=False)
    cfg.check_machine(has_cuda=True, cpu_bfloat16=False)
    load_config(["transfer.local=auto"]).check_machine(has_cuda=False, cpu_bfloat16=False)
    with pytest.raises(ConfigError, match="Mooncake cannot serve"):
        load_config(["transfer=mooncake", "transfer.local=cuda_ipc"])
