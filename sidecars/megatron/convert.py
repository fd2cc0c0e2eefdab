"""HF <-> Megatron weight conversion for the Llama/Qwen2/Qwen3(-MoE) family: the only place names and layouts map.

Pure functions on full (unsharded) tensors plus the tensor-parallel split/merge rules, so every
producer (initial load, EXPORT into a weight buffer, checkpoints) converts the same way.

Layouts (Megatron side):
- `linear_qkv`: per query group g, the group's q heads then its k head then its v head
  ([kv_heads * (heads_per_group + 2) * head_dim, hidden]); splitting dim 0 across TP ranks
  gives each rank whole groups.
- `linear_fc1`: [gate; up]. Under TP each rank holds [gate_r; up_r], so it is not a plain chunk.
- Qwen3's per-head q/k norms (`q_layernorm`, `k_layernorm`, [head_dim]) are replicated under TP.
- Layer norms sit in their own modules with the local spec and inside `linear_qkv` /
  `linear_fc1` (`layer_norm_weight`) with the Transformer Engine spec (`fused_norms=True`); an MoE
  layer's MLP norm is always its own module.
- MoE: the router is `mlp.router.weight` ([experts, hidden], HF's `mlp.gate`); expert e's [gate; up]
  and down are `mlp.experts.local_experts.<e>.linear_fc1/fc2`. Full tensors number experts globally;
  an expert-parallel rank holds a contiguous block of them, numbered from 0 (`ep_local_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from checkpoint_engine.contracts.config import ConfigError
from sidecars.megatron.arch import ModelArch

Tensors = dict[str, torch.Tensor]


class ConversionError(ConfigError):
    pass


def megatron_weights(state: Mapping[str, torch.Tensor]) -> Tensors:
    """A Megatron state dict's weights by name: Transformer Engine's `_extra_state` entries left out."""
    return {n: t for n, t in state.items() if not n.endswith("_extra_state")}


def has_fused_norms(names: Iterable[str]) -> bool:
    """Whether Megatron weights with these names keep their norms inside linear_qkv / linear_fc1 (TE spec)."""
    return any(n.endswith("layer_norm_weight") for n in names)


def megatron_layer_names(fused_norms: bool) -> dict[str, str]:
    """Megatron per-layer suffix for each logical tensor."""
    return {
        "attn_norm": "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight",
        "qkv": "self_attention.linear_qkv.weight",
        "qkv_bias": "self_attention.linear_qkv.bias",
        "q_norm": "self_attention.q_layernorm.weight",
        "k_norm": "self_attention.k_layernorm.weight",
        "proj": "self_attention.linear_proj.weight",
        "mlp_norm": "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }


def _take(hf: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in hf:
        raise ConversionError(f"HF checkpoint lacks tensor {name!r} (expected shape {list(shape)})")
    t = hf[name]
    if tuple(t.shape) != shape:
        raise ConversionError(f"HF tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def moe_layer_names(expert: int) -> dict[str, str]:
    """Megatron per-layer suffixes of an MoE layer's router and of expert `expert` (global index)."""
    e = f"mlp.experts.local_experts.{expert}."
    return {"router": "mlp.router.weight", "fc1": e + "linear_fc1.weight", "fc2": e + "linear_fc2.weight"}


_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert a Megatron tensor belongs to (None: not an expert's)."""
    m = _EXPERT.search(name)
    return None if m is None else int(m.group(1))


def ep_local_name(name: str, offset: int) -> str:
    """`name` with its expert index shifted by `offset`: global -> local with -first, local -> global with +first."""
    return _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + offset}.", name, count=1)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], arch: ModelArch, fused_norms: bool = False) -> Tensors:
    """Full Megatron tensors (global layer indices) from HF-named tensors; every HF tensor must be used."""
    a, names = arch, megatron_layer_names(fused_norms)
    q_rows, kv_rows = a.heads * a.head_dim, a.kv_heads * a.head_dim
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        used.add(name)
        return _take(hf, name, shape)

    out: Tensors = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight", (a.vocab_size, a.hidden))}
    for i in range(a.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = take(p + "self_attn.q_proj.weight", (q_rows, a.hidden))
        k = take(p + "self_attn.k_proj.weight", (kv_rows, a.hidden))
        v = take(p + "self_attn.v_proj.weight", (kv_rows, a.hidden))
        out[m + names["qkv"]] = interleave_qkv(q, k, v, a)
        if a.qkv_bias:
            qb = take(p + "self_attn.q_proj.bias", (q_rows,))
            kb = take(p + "self_attn.k_proj.bias", (kv_rows,))
            vb = take(p + "self_attn.v_proj.bias", (kv_rows,))
            out[m + names["qkv_bias"]] = interleave_qkv(qb, kb, vb, a)
        if a.qk_norm:
            out[m + names["q_norm"]] = take(p + "self_attn.q_norm.weight", (a.head_dim,))
            out[m + names["k_norm"]] = take(p + "self_attn.k_norm.weight", (a.head_dim,))
        out[m + names["proj"]] = take(p + "self_attn.o_proj.weight", (a.hidden, q_rows))
        out[m + names["attn_norm"]] = take(p + "input_layernorm.weight", (a.hidden,))
        if a.moe is None:
            out[m + names["mlp_norm"]] = take(p + "post_attention_layernorm.weight", (a.hidden,))
            gate = take(p + "mlp.gate_proj.weight", (a.intermediate, a.hidden))
            up = take(p + "mlp.up_proj.weight", (a.intermediate, a.hidden))
            out[m + names["fc1"]] = torch.cat([gate, up], dim=0)
            out[m + names["fc2"]] = take(p + "mlp.down_proj.weight", (a.hidden, a.intermediate))
            continue
        out[m + "pre_mlp_layernorm.weight"] = take(p + "post_attention_layernorm.weight", (a.hidden,))
        out[m + moe_layer_names(0)["router"]] = take(p + "mlp.gate.weight", (a.moe.count, a.hidden))
        width = a.moe.intermediate
        for e in range(a.moe.count):
            x, moe = f"{p}mlp.experts.{e}.", moe_layer_names(e)
            gate = take(x + "gate_proj.weight", (width, a.hidden))
            up = take(x + "up_proj.weight", (width, a.hidden))
            out[m + moe["fc1"]] = torch.cat([gate, up], dim=0)
            out[m + moe["fc2"]] = take(x + "down_proj.weight", (a.hidden, width))
    out["decoder.final_layernorm.weight"] = take("model.norm.weight", (a.hidden,))
    if not a.tie_embeddings:
        out["output_layer.weight"] = take("lm_head.weight", (a.vocab_size, a.hidden))
    # Buffers some exporters write (rotary frequencies) carry no weights.
    unused = sorted(n for n in hf if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if a.tie_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # a tied model may still store the shared matrix twice
    if unused:
        raise ConversionError(f"HF tensors not understood for family {a.family!r}: {unused[:8]}")
    return out


def megatron_to_hf(mg: Mapping[str, torch.Tensor], arch: ModelArch, fused_norms: bool = False) -> Tensors:
    """HF-named tensors from full Megatron tensors (global layer indices)."""
    a, names = arch, megatron_layer_names(fused_norms)

    def get(name: str) -> torch.Tensor:
        if name not in mg:
            raise ConversionError(f"Megatron state lacks tensor {name!r}")
        return mg[name]

    out: Tensors = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")}
    for i in range(a.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = split_qkv(get(m + names["qkv"]), a)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
        out[p + "self_attn.v_proj.weight"] = v
        if a.qkv_bias:
            qb, kb, vb = split_qkv(get(m + names["qkv_bias"]), a)
            out[p + "self_attn.q_proj.bias"], out[p + "self_attn.k_proj.bias"] = qb, kb
            out[p + "self_attn.v_proj.bias"] = vb
        if a.qk_norm:
            out[p + "self_attn.q_norm.weight"] = get(m + names["q_norm"])
            out[p + "self_attn.k_norm.weight"] = get(m + names["k_norm"])
        out[p + "self_attn.o_proj.weight"] = get(m + names["proj"])
        out[p + "input_layernorm.weight"] = get(m + names["attn_norm"])
        if a.moe is None:
            out[p + "post_attention_layernorm.weight"] = get(m + names["mlp_norm"])
            gate, up = get(m + names["fc1"]).chunk(2, dim=0)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = get(m + names["fc2"])
            continue
        out[p + "post_attention_layernorm.weight"] = get(m + "pre_mlp_layernorm.weight")
        out[p + "mlp.gate.weight"] = get(m + moe_layer_names(0)["router"])
        for e in range(a.moe.count):
            x, moe = f"{p}mlp.experts.{e}.", moe_layer_names(e)
            out[x + "gate_proj.weight"], out[x + "up_proj.weight"] = get(m + moe["fc1"]).chunk(2, dim=0)
            out[x + "down_proj.weight"] = get(m + moe["fc2"])
    out["model.norm.weight"] = get("decoder.final_layernorm.weight")
    if not a.tie_embeddings:
        out["lm_head.weight"] = get("output_layer.weight")
    return {k: v.contiguous() for k, v in out.items()}


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: ModelArch) -> torch.Tensor:
    rest = q.shape[1:]
    q = q.reshape(a.kv_heads, a.heads_per_group * a.head_dim, *rest)
    k = k.reshape(a.kv_heads, a.head_dim, *rest)
    v = v.reshape(a.kv_heads, a.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, a: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    grouped = qkv.reshape(a.kv_heads, (a.heads_per_group + 2) * a.head_dim, *rest)
    q, k, v = grouped.split([a.heads_per_group * a.head_dim, a.head_dim, a.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def tp_split_dim(name: str) -> int | None:
    """Dimension a Megatron tensor is split on across TP ranks (None: replicated; experts are split
    over expert-parallel ranks instead, whole)."""
    if expert_index(name) is not None:
        return None
    if name.endswith(
        ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight")
    ):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The slice of `full` that TP rank `rank` of `size` holds."""
    dim = tp_split_dim(name)
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ConversionError(f"{name}: dim {dim} of shape {list(full.shape)} is not divisible by TP={size}")
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def tp_merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_shard` over all ranks' shards, in rank order."""
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)
