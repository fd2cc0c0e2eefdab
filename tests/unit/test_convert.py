"""HF <-> Megatron naming and layout rules, on random tensors, without processes."""

from __future__ import annotations

import pytest
import torch

from sidecars.megatron.arch import ModelArch
from sidecars.megatron.convert import (
    ConversionError,
    ep_local_name,
    expert_index,
    hf_to_megatron,
    interleave_qkv,
    megatron_to_hf,
    split_qkv,
    tp_merge,
    tp_shard,
)


def _arch(**over: object) -> ModelArch:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "tie_word_embeddings": False,
    }
    cfg.update(over)
    return ModelArch.from_hf_config(cfg)


def _hf_tensors(a: ModelArch) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    shapes = {"model.embed_tokens.weight": (a.vocab_size, a.hidden), "model.norm.weight": (a.hidden,)}
    if not a.tie_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, a.hidden)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, a.hidden),
            p + "self_attn.k_proj.weight": (kv, a.hidden),
            p + "self_attn.v_proj.weight": (kv, a.hidden),
            p + "self_attn.o_proj.weight": (a.hidden, q),
            p + "input_layernorm.weight": (a.hidden,),
            p + "post_attention_layernorm.weight": (a.hidden,),
        }
        if a.moe is None:
            shapes |= {
                p + "mlp.gate_proj.weight": (a.intermediate, a.hidden),
                p + "mlp.up_proj.weight": (a.intermediate, a.hidden),
                p + "mlp.down_proj.weight": (a.hidden, a.intermediate),
            }
        else:
            shapes[p + "mlp.gate.weight"] = (a.moe.count, a.hidden)
            for e in range(a.moe.count):
                x, w = f"{p}mlp.experts.{e}.", a.moe.intermediate
                shapes |= {x + "gate_proj.weight": (w, a.hidden), x + "up_proj.weight": (w, a.hidden)}
                shapes[x + "down_proj.weight"] = (a.hidden, w)
        if a.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
        if a.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (a.head_dim,), p + "self_attn.k_norm.weight": (a.head_dim,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


MOE = {"num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True}


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fused_norms", [False, True])
def test_round_trip_is_exact(family: str, tie: bool, fused_norms: bool) -> None:
    a = _arch(architectures=[family], tie_word_embeddings=tie, **(MOE if "Moe" in family else {}))
    hf = _hf_tensors(a)
    back = megatron_to_hf(hf_to_megatron(hf, a, fused_norms), a, fused_norms)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert torch.equal(back[name], t), name


def test_qkv_groups_are_interleaved() -> None:
    a = _arch()  # 4 heads in 2 groups, head_dim 8
    q = torch.arange(32).repeat_interleave(1).reshape(32, 1).float()
    k = 100 + torch.arange(16).reshape(16, 1).float()
    v = 200 + torch.arange(16).reshape(16, 1).float()
    qkv = interleave_qkv(q, k, v, a).flatten().tolist()
    group0 = list(range(16)) + list(range(100, 108)) + list(range(200, 208))
    assert qkv[:32] == group0
    assert [t.flatten().tolist() for t in split_qkv(interleave_qkv(q, k, v, a), a)] == [
        q.flatten().tolist(),
        k.flatten().tolist(),
        v.flatten().tolist(),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.layers.0.input_layernorm.weight",
    ],
)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_merge_inverse(name: str, tp: int) -> None:
    full = torch.randn(16, 8) if not name.endswith(("bias", "layernorm.weight")) else torch.randn(16)
    shards = [tp_shard(name, full, r, tp) for r in range(tp)]
    assert torch.equal(tp_merge(name, shards), full)
    if name.endswith("linear_fc1.weight") and tp == 2:
        gate, up = full.chunk(2)
        assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))  # [gate_r; up_r] per rank


def test_shape_mismatch_names_tensor_and_shape() -> None:
    a = _arch()
    hf = _hf_tensors(a)
    hf["model.layers.1.mlp.up_proj.weight"] = torch.zeros(47, 32)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[47, 32\].*\[48, 32\]"):
        hf_to_megatron(hf, a)


def test_missing_and_unknown_tensors_are_errors() -> None:
    a = _arch()
    hf = _hf_tensors(a)
    del hf["model.norm.weight"]
    with pytest.raises(ConversionError, match=r"lacks tensor 'model\.norm\.weight'"):
        hf_to_megatron(hf, a)
    hf = _hf_tensors(a) | {"model.layers.0.self_attn.q_norm.weight": torch.zeros(8)}
    with pytest.raises(ConversionError, match="q_norm"):
        hf_to_megatron(hf, a)


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        _arch(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        _arch(hidden_act="gelu")


def test_tensor_parallel_divisibility() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor_parallel=4"):
        _arch().check_tensor_parallel(4)


def test_qwen3_has_qk_norms_and_a_bias_only_where_attention_bias_says() -> None:
    a = _arch(architectures=["Qwen3ForCausalLM"])
    assert (a.family, a.qk_norm, a.qkv_bias) == ("qwen3", True, False)
    assert _arch(architectures=["Qwen3ForCausalLM"], attention_bias=True).qkv_bias
    assert _arch(architectures=["Qwen2ForCausalLM"]).qkv_bias
    assert not _arch().qk_norm


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_scaling_is_read_from_either_spelling(key: str) -> None:
    params = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    a = _arch(**{key: params | {"original_max_position_embeddings": 4096, "rope_theta": 500000.0}})
    assert a.rope_scaling is not None
    assert (a.rope_scaling.factor, a.rope_scaling.original_max_positions) == (32.0, 4096)
    assert a.rope_theta == 500000.0
    assert _arch(rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_unsupported_rope_and_layouts_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported: \['default', 'llama3'\]"):
        _arch(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="mlp_bias"):
        _arch(mlp_bias=True)
    with pytest.raises(ValueError, match="use_sliding_window"):
        _arch(architectures=["Qwen3ForCausalLM"], use_sliding_window=True)


def test_moe_layers_map_router_and_each_expert() -> None:
    a = _arch(architectures=["Qwen3MoeForCausalLM"], **MOE)
    assert a.moe is not None
    assert a.moe.count == 4
    assert a.moe.top_k == 2
    assert a.qk_norm
    hf = _hf_tensors(a)
    mg = hf_to_megatron(hf, a)
    assert torch.equal(mg["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])
    fc1 = mg["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.experts.3.gate_proj.weight"], hf["model.layers.0.mlp.experts.3.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate, up]))
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in mg
    # Experts are never split over TP ranks; EP ranks hold whole experts, renumbered from 0.
    name = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    assert tp_shard(name, fc1, 0, 2) is fc1
    assert expert_index(name) == 3
    assert expert_index("decoder.layers.0.mlp.router.weight") is None
    assert ep_local_name(name, -2) == "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"
    assert ep_local_name(ep_local_name(name, -2), 2) == name


def test_moe_layouts_outside_qwen3_moe_are_refused() -> None:
    with pytest.raises(ValueError, match="every layer is MoE"):
        _arch(architectures=["Qwen3MoeForCausalLM"], **MOE, mlp_only_layers=[0])
    with pytest.raises(ValueError, match="every layer is MoE"):
        _arch(architectures=["Qwen3MoeForCausalLM"], **MOE, decoder_sparse_step=2)
    with pytest.raises(ValueError, match="shared experts"):
        _arch(architectures=["Qwen3MoeForCausalLM"], **MOE, shared_expert_intermediate_size=64)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"):
        _arch(architectures=["Qwen3MoeForCausalLM"], **{**MOE, "num_experts_per_tok": 5})
    a = _arch(architectures=["Qwen3MoeForCausalLM"], **MOE)
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by expert_parallel=3"):
        a.check_expert_parallel(3)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        _arch().check_expert_parallel(2)
