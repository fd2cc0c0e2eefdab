"""The model family the trainer supports (Llama / Qwen2: RMSNorm, SwiGLU, RoPE, GQA), read from an
HF `config.json`. Anything outside the family fails here, before a tensor is touched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


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
        if cfg.get("rope_scaling") not in (None, {}) and cfg["rope_scaling"].get("rope_type", "default") != "default":
            raise ValueError(f"rope_scaling {cfg['rope_scaling']} is not supported; only plain RoPE")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
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
            rope_theta=float(rope_theta),
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelArch:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; is it an HF model directory?")
        return cls.from_hf_config(json.loads(path.read_text()))

    def check_tensor_parallel(self, tp: int) -> None:
        for what, n in (
            ("num_key_value_heads", self.kv_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate),
        ):
            if n % tp:
                raise ValueError(f"{what}={n} is not divisible by tensor_parallel={tp}")
