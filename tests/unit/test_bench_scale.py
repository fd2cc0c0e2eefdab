"""`timeshare bench scale`'s model: the shapes are Qwen2.5's, and the directory it writes is a Qwen2
checkpoint of exactly the bytes the memory estimate counts."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.bench_scale import SHAPES, parameter_count, write_random_model
from sidecars.megatron.arch import ModelArch


def test_the_shapes_have_qwen25s_parameter_counts() -> None:
    # Qwen2.5-0.5B and -1.5B: 0.49B and 1.54B parameters (their model cards; embeddings tied).
    assert round(parameter_count(SHAPES["0.5b"]) / 1e6) == 494
    assert round(parameter_count(SHAPES["1.5b"]) / 1e6) == 1544


def test_the_random_model_is_a_qwen2_checkpoint_of_the_counted_bytes(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    shape = {"layers": 2, "hidden": 128, "heads": 2, "kv_heads": 1, "intermediate": 256}
    written = write_random_model(tmp_path / "m", shape, torch.bfloat16)
    assert written == 2 * parameter_count(shape)
    arch = ModelArch.from_pretrained(tmp_path / "m")
    assert (arch.family, arch.vocab_size, arch.tie_embeddings, arch.qkv_bias) == ("qwen2", 151936, True, True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], torch.ones(128, dtype=torch.bfloat16))
    assert tensors["model.embed_tokens.weight"].float().std().item() > 0.01
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")) <= arch.vocab_size
