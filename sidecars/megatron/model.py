"""Build a megatron-core GPTModel for an HF Llama/Qwen2/Qwen3(-MoE) checkpoint, load its weights, export them back.

Consumes: an HF model directory (config.json + safetensors), an initialised Megatron parallel
state (`parallel.init_distributed`). Produces: the model on this rank (its TP shard, and its block
of the experts under expert parallelism), and, on export, full HF-named tensors gathered over the
tensor- and expert-parallel groups.
Uses the local layer spec on CPU and the Transformer Engine spec where TE is installed on GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from sidecars.megatron import compat
from sidecars.megatron.arch import Llama3Rope, ModelArch
from sidecars.megatron.convert import (
    ConversionError,
    Tensors,
    ep_local_name,
    expert_index,
    has_fused_norms,
    hf_to_megatron,
    megatron_to_hf,
    megatron_weights,
    tp_merge,
    tp_shard,
    tp_split_dim,
)


def use_transformer_engine() -> bool:
    if not compat.on_gpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(arch: ModelArch, params_dtype: torch.dtype = torch.float32):  # -> GPTModel
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    arch.check_tensor_parallel(tp)
    arch.check_expert_parallel(ep)
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError(
            "the trainer supports pipeline_parallel=1 only: megatron-core's pipeline schedules allocate on "
            "'cuda' and do not run on CPU, and no schedule is wired into the trainer for GPUs"
        )
    config = TransformerConfig(
        num_layers=arch.layers,
        hidden_size=arch.hidden,
        ffn_hidden_size=arch.intermediate,
        num_attention_heads=arch.heads,
        num_query_groups=arch.kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        use_cpu_initialization=not compat.on_gpu(),
        **_moe_config(arch, ep),
    )
    experts = None if arch.moe is None else arch.moe.count
    if use_transformer_engine():
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=experts, qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_positions,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        parallel_output=True,
    )
    if arch.rope_scaling is not None:
        _scale_rope(model.rotary_pos_emb, arch.rope_scaling)
    return model.to(compat.device())


def _moe_config(arch: ModelArch, ep: int) -> dict[str, object]:
    """TransformerConfig's MoE fields for Qwen3-MoE's routing: softmax over the experts then top-k
    (`norm_topk_prob`: the k probabilities renormalised, which is top-k then softmax), no token
    dropping, no auxiliary loss (the policy-gradient loss alone trains the router), fp32 router."""
    if arch.moe is None:
        return {}
    return {
        "num_moe_experts": arch.moe.count,
        "moe_router_topk": arch.moe.top_k,
        "moe_ffn_hidden_size": arch.moe.intermediate,
        "moe_router_pre_softmax": not arch.moe.normalize_top_k,
        "moe_router_score_function": "softmax",
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_router_dtype": "fp32",
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": 1,
        # The all-to-all dispatcher makes a CUDA stream at construction; all-gather runs anywhere.
        "moe_token_dispatcher_type": "alltoall" if compat.on_gpu() else "allgather",
    }


def expert_offset(arch: ModelArch) -> int:
    """The global index of this rank's first expert (0 for a dense model or without EP)."""
    from megatron.core import parallel_state

    if arch.moe is None:
        return 0
    ep = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (arch.moe.count // ep)


def _scale_rope(rope: torch.nn.Module, s: Llama3Rope) -> None:
    """Llama 3.x's RoPE scaling with the checkpoint's own parameters: GPTModel's `rope_scaling` flag
    fixes low/high frequency factors and the original context at Llama 3.1's (1, 4, 8192)."""
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_positions,
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights by local name (TE's `_extra_state` and buffers left out)."""
    return megatron_weights(model.state_dict(keep_vars=True))


def uses_fused_norms(model: torch.nn.Module) -> bool:
    return has_fused_norms(_weights(model))


def read_hf_tensors(model_dir: str | Path) -> Tensors:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors files")
    tensors: Tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_hf_weights(model: torch.nn.Module, hf: Tensors, arch: ModelArch) -> None:
    """Copy HF tensors into this rank's shard of `model`; shape mismatches name the tensor."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    first = expert_offset(arch)
    full = hf_to_megatron(hf, arch, fused_norms=uses_fused_norms(model))
    with torch.no_grad():
        for name, param in _weights(model).items():
            source = ep_local_name(name, first)  # an expert's global name; others unchanged
            if source not in full:
                raise ConversionError(f"no HF tensor maps to Megatron parameter {name!r}")
            shard = tp_shard(name, full[source], rank, size)
            if shard.shape != param.shape:
                raise ConversionError(
                    f"{name}: converted shard has shape {list(shard.shape)}, the model expects {list(param.shape)}"
                )
            param.copy_(shard)


def export_hf_weights(
    model: torch.nn.Module, arch: ModelArch, host: Mapping[torch.nn.Parameter, torch.Tensor] | None = None
) -> Tensors:
    """Full HF-named tensors on the host, gathered over the TP group and, for experts, the EP group
    (the same on every rank).

    `host` maps parameters to their host copies while the model is offloaded (EXPORT follows
    OFFLOAD); each shard visits the device only for the gather, which NCCL needs there. A tensor
    that is already whole on the host is not copied: it shares the parameter's (or host copy's)
    storage, which EXPORT writes out before anything trains; clone what must outlive a step.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    full: Tensors = {}
    for name, param in _weights(model).items():
        local = (host[param] if host is not None and param in host else param).detach().contiguous()
        if expert_index(name) is not None:
            full.update(_gather_experts(name, local, arch, ep))
            continue
        if size == 1 or tp_split_dim(name) is None:
            full[name] = local.cpu()
            continue
        local = local.to(compat.device())
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local, group=group)
        full[name] = tp_merge(name, [t.cpu() for t in shards])
    return megatron_to_hf(full, arch, fused_norms=uses_fused_norms(model))


def _gather_experts(name: str, local: torch.Tensor, arch: ModelArch, ep: int) -> Tensors:
    """Every EP rank's copy of local expert tensor `name`, by global name (EP rank r's expert j is
    global expert r * experts/EP + j)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if ep == 1:
        return {name: local.cpu()}
    assert arch.moe is not None
    local = local.to(compat.device())
    copies = [torch.empty_like(local) for _ in range(ep)]
    dist.all_gather(copies, local, group=parallel_state.get_expert_model_parallel_group())
    per_rank = arch.moe.count // ep
    return {ep_local_name(name, r * per_rank): t.cpu() for r, t in enumerate(copies)}


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [batch, seq, vocab] for `tokens` [batch, seq] (gathered over TP)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    dev = compat.device()
    tokens = tokens.to(dev)
    positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, compat.causal_mask(tokens.shape[1], dev))
    return gather_from_tensor_model_parallel_region(logits)
