"""scripts/device_check.sh, which only a machine with an NVIDIA GPU and the GPU stack runs: it parses, its
overrides make a valid job config of Qwen2.5-0.5B's shape, and without a GPU it stops at once with one JSON line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from engine.tiny_model import build_tokenizer, hf_config
from launch.bench_plan import PUBLISHED
from launch.config_loading import load_config
from launch.hf_shapes import parameter_count, tensor_shapes

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_check.sh"


def _overrides() -> list[str]:
    lines = SCRIPT.read_text().splitlines()
    start = lines.index("OVERRIDES=(") + 1
    return [line.strip() for line in lines[start : lines.index(")", start)]]


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_its_model_is_qwen2_5_0_5b_shaped_in_bfloat16_for_both_lifecycles() -> None:
    for lifecycle in ("terminate", "keep_alive"):  # bench cycle's two runs; keep_alive with --sleep-level 1
        sleep = ["rollout.sleep_level=1"] if lifecycle == "keep_alive" else []
        cfg = load_config([*_overrides(), "run.iterations=3", f"rollout.lifecycle={lifecycle}", *sleep])
        cfg.check_machine(has_cuda=True, cpu_bfloat16=False)
        assert cfg.model.dtype == "bfloat16"
    spec = cfg.model.tiny_spec(seed=0)
    written = hf_config(spec, build_tokenizer(spec)).to_dict()
    published = PUBLISHED["qwen2.5-0.5b"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert written[key] == published[key], key
    assert written["num_key_value_heads"] == published["num_key_value_heads"]
    assert written["tie_word_embeddings"] is True
    # Qwen's 151,936-token embedding is most of what the smaller vocabulary leaves out.
    left_out = (published["vocab_size"] - written["vocab_size"]) * published["hidden_size"]
    assert abs(parameter_count(tensor_shapes(written)) + left_out - parameter_count(tensor_shapes(published))) < 1e6


def test_without_a_gpu_it_stops_at_once_saying_why() -> None:
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 1
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["check"] == "device"
    assert "NVIDIA GPU" in line["error"]
