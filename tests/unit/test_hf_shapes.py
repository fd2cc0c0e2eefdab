"""The planner's tensor list from a config.json: the same names and shapes as transformers builds, and the
published parameter counts of models too large to build here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.bench_plan import PUBLISHED
from launch.hf_shapes import parameter_count, tensor_bytes, tensor_shapes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_the_shapes_are_the_ones_a_saved_checkpoint_holds(arch: str, tmp_path: Path) -> None:
    """Against the checkpoint on disk (transformers fuses Qwen3-MoE's experts in memory, not in the files)."""
    from safetensors import safe_open

    spec = TinyModelSpec(arch=arch, layers=2)
    out = write_tiny_model(tmp_path, spec)
    saved = {}
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            saved |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    config = json.loads((out / "config.json").read_text())
    assert dict(tensor_shapes(config)) == saved


DEEPSEEK_V3 = {
    **PUBLISHED["kimi-k2"],
    "model_type": "deepseek_v3",
    "first_k_dense_replace": 3,
    "n_routed_experts": 256,
    "num_attention_heads": 128,
    "vocab_size": 129280,
}


@pytest.mark.parametrize(
    ("cfg", "published"),
    [
        (PUBLISHED["qwen2.5-0.5b"], 0.494e9),  # Qwen2.5-0.5B: 0.49B
        (DEEPSEEK_V3, 671e9),  # DeepSeek-V3: 671B without its multi-token-prediction layer
        (PUBLISHED["kimi-k2"], 1.03e12),  # Kimi K2: "1T" (1.03T in its model card's count)
    ],
)
def test_parameter_counts_match_the_published_ones(cfg: dict, published: float) -> None:
    assert parameter_count(tensor_shapes(cfg)) == pytest.approx(published, rel=0.005)


def test_fp8_stores_projections_in_a_byte_with_block_scales_and_keeps_the_rest_in_bf16() -> None:
    shapes = [("model.embed_tokens.weight", (1000, 256)), ("model.layers.0.mlp.up_proj.weight", (300, 256))]
    assert tensor_bytes(shapes, "fp8") == [
        ("model.embed_tokens.weight", 2 * 1000 * 256),
        ("model.layers.0.mlp.up_proj.weight", 300 * 256),
        ("model.layers.0.mlp.up_proj.weight_scale_inv", 4 * 3 * 2),  # ceil(300/128) x ceil(256/128) blocks
    ]
    assert tensor_bytes(shapes, "float32")[1] == ("model.layers.0.mlp.up_proj.weight", 4 * 300 * 256)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tensor_bytes(shapes, "int4")


def test_an_unknown_family_is_named() -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one the planner knows"):
        tensor_shapes({"model_type": "gpt2"})
