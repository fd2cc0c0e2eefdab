"""The tensors an HF checkpoint of a given `config.json` holds, by name and shape, without any weights: what the
push planner (`timeshare bench plan`) lays out for models far larger than this machine.

Consumes: a config dict of a Llama / Qwen2 / Qwen3 (dense), Qwen3-MoE, or DeepSeek-V3-style model (multi-head
latent attention, a shared expert and routed experts after `first_k_dense_replace` dense layers: DeepSeek-V3,
Kimi-K2). Produces: (name, shape) in checkpoint order, and their bytes for a dtype; `fp8` is the block-quantised
layout of DeepSeek-V3 / Kimi-K2's releases (projection weights one byte each plus a float32 scale per 128 x 128
block, everything else bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

Shape = tuple[int, ...]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = (*DTYPE_BYTES, "fp8")
FP8_BLOCK = 128
DENSE = ("llama", "qwen2", "qwen3")
MLA = ("deepseek_v3", "kimi_k2")


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, Shape]]:
    """Every tensor of the checkpoint, embeddings first, then layer by layer, then the final norm and head."""
    kind = cfg.get("model_type")
    known = (*DENSE, "qwen3_moe", *MLA)
    if kind not in known:
        raise ValueError(f"model_type {kind!r} is not one the planner knows; known: {list(known)}")
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        shapes += [(p + "self_attn." + n, s) for n, s in (_mla(cfg) if kind in MLA else _attention(cfg, kind))]
        shapes += [(p + "mlp." + n, s) for n, s in _mlp(cfg, kind, i)]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes


def _attention(cfg: dict[str, Any], kind: str) -> Iterator[tuple[str, Shape]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, head_dim = cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or h // heads
    for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv * head_dim), ("v_proj", kv * head_dim)):
        yield f"{name}.weight", (rows, h)
        if kind == "qwen2" or cfg.get("attention_bias"):
            yield f"{name}.bias", (rows,)
    yield "o_proj.weight", (h, heads * head_dim)
    if kind in ("qwen3", "qwen3_moe"):
        yield from (("q_norm.weight", (head_dim,)), ("k_norm.weight", (head_dim,)))


def _mla(cfg: dict[str, Any]) -> Iterator[tuple[str, Shape]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_rank, kv_rank = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    if q_rank:
        yield from (("q_a_proj.weight", (q_rank, h)), ("q_a_layernorm.weight", (q_rank,)))
        yield "q_b_proj.weight", (heads * (nope + rope), q_rank)
    else:
        yield "q_proj.weight", (heads * (nope + rope), h)
    yield from (("kv_a_proj_with_mqa.weight", (kv_rank + rope, h)), ("kv_a_layernorm.weight", (kv_rank,)))
    yield from (("kv_b_proj.weight", (heads * (nope + v), kv_rank)), ("o_proj.weight", (h, heads * v)))


def _swiglu(prefix: str, h: int, width: int) -> list[tuple[str, Shape]]:
    return [
        (f"{prefix}gate_proj.weight", (width, h)),
        (f"{prefix}up_proj.weight", (width, h)),
        (f"{prefix}down_proj.weight", (h, width)),
    ]


def _mlp(cfg: dict[str, Any], kind: str, layer: int) -> list[tuple[str, Shape]]:
    h = cfg["hidden_size"]
    # Qwen3-MoE's config.json says num_experts; transformers' own config object num_local_experts
    routed = (
        (cfg.get("num_experts") or cfg.get("num_local_experts")) if kind == "qwen3_moe" else cfg.get("n_routed_experts")
    )
    if not routed or (kind in MLA and layer < cfg.get("first_k_dense_replace", 0)):
        return _swiglu("", h, cfg["intermediate_size"])
    width = cfg["moe_intermediate_size"]
    out = [("gate.weight", (routed, h))]
    if kind in MLA:
        out.append(("gate.e_score_correction_bias", (routed,)))
    for e in range(routed):
        out += _swiglu(f"experts.{e}.", h, width)
    if cfg.get("n_shared_experts"):
        out += _swiglu("shared_experts.", h, width * cfg["n_shared_experts"])
    return out


def tensor_bytes(shapes: list[tuple[str, Shape]], dtype: str) -> list[tuple[str, int]]:
    """(name, bytes) of each tensor as stored in `dtype`; with fp8, each block-quantised weight is followed by its
    `weight_scale_inv` (as in the FP8 releases)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out: list[tuple[str, int]] = []
    for name, shape in shapes:
        count = math.prod(shape)
        if dtype == "fp8" and _quantised(name, shape):
            out.append((name, count))
            blocks = math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
            out.append((name.removesuffix("weight") + "weight_scale_inv", 4 * blocks))
        else:
            out.append((name, count * DTYPE_BYTES.get(dtype, 2)))
    return out


def _quantised(name: str, shape: Shape) -> bool:
    """Projection weights are quantised; embeddings, the head, norms and the router stay bf16."""
    return len(shape) == 2 and name.endswith("proj.weight")


def parameter_count(shapes: list[tuple[str, Shape]]) -> int:
    return sum(math.prod(s) for _, s in shapes)
