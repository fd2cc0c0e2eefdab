"""The model families the trainer supports, read from an HF `config.json`: Llama (Llama 3.x's RoPE
scaling included), Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm) and Qwen3-MoE (Qwen3's attention,
every layer's MLP a top-k routed mixture of SwiGLU experts). All share RMSNorm, SwiGLU, RoPE and GQA.
Anything outside them fails here, before a tensor is touched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.x's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True)
class Experts:
    """Qwen3-MoE's MLP: `count` SwiGLU experts of width `intermediate`, `top_k` chosen per token by a
    softmax router; `normalize_top_k`: the chosen probabilities rescaled to sum to 1."""

    count: int
    top_k: int
    intermediate: int
    normalize_top_k: bool


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool = False
    rope_scaling: Llama3Rope | None = None
    moe: Experts | None = None  # None: every layer's MLP is dense

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise ValueError(f"unsupported architecture {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported; only bias-free MLPs")
        if cfg.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported; only full attention")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        rope_theta, rope_scaling = _rope(cfg)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has a qkv bias; Llama and Qwen3 have one only where attention_bias says so.
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_scaling=rope_scaling,
            moe=_experts(cfg) if family == "qwen3_moe" else None,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelArch:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; is it an HF model directory?")
        return cls.from_hf_config(json.loads(path.read_text()))

    def check_tensor_parallel(self, tp: int) -> None:
        if self.moe is not None and tp > 1:
            raise ValueError(
                f"tensor_parallel={tp} with an MoE model: MoE models train at tensor_parallel=1 here, "
                "their experts split over the data-parallel ranks by expert_parallel"
            )
        for what, n in (
            ("num_key_value_heads", self.kv_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate),
        ):
            if n % tp:
                raise ValueError(f"{what}={n} is not divisible by tensor_parallel={tp}")

    def check_expert_parallel(self, ep: int) -> None:
        if ep == 1:
            return
        if self.moe is None:
            raise ValueError(f"expert_parallel={ep} needs a mixture-of-experts model; {self.family} is dense")
        if self.moe.count % ep:
            raise ValueError(f"num_experts={self.moe.count} is not divisible by expert_parallel={ep}")


def _experts(cfg: dict[str, Any]) -> Experts:
    """Qwen3-MoE's experts; layouts that mix dense and MoE layers, or add shared experts, are refused."""
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError(
            f"decoder_sparse_step={cfg.get('decoder_sparse_step')} mlp_only_layers={cfg.get('mlp_only_layers')}: "
            "only models whose every layer is MoE are supported (decoder_sparse_step 1, no mlp_only_layers)"
        )
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts are not supported; Qwen3-MoE has none")
    experts = Experts(
        count=int(cfg.get("num_experts") or cfg["num_local_experts"]),  # transformers 5 writes the latter
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate=int(cfg["moe_intermediate_size"]),
        normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
    )
    if not 1 <= experts.top_k <= experts.count:
        raise ValueError(f"num_experts_per_tok={experts.top_k} must be in [1, num_experts={experts.count}]")
    return experts


def _rope(cfg: dict[str, Any]) -> tuple[float, Llama3Rope | None]:
    """RoPE's base and scaling, from `rope_scaling` (checkpoints written before transformers 5) or
    `rope_parameters` (transformers 5)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(cfg.get("rope_theta") or params.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
    scaling = Llama3Rope(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {params}")
    return theta, scaling
