"""Tiny HF-format models (Llama, Qwen2, Qwen3, Qwen3-MoE) with a character-level or a byte-level BPE tokenizer
(`engine.bpe_tokenizer`), made locally (nothing is downloaded).

`write_tiny_model(dir, TinyModelSpec(...))` writes config.json, model.safetensors and the
tokenizer files that transformers, vLLM and the Megatron loader read like any real checkpoint.
head_dim must be >= 32: vLLM's CPU attention backend rejects 16.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from checkpoint_engine.contracts.config import ConfigError

Arch = Literal["llama", "qwen2", "qwen3", "qwen3_moe"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "qwen3", "qwen3_moe")
RopeScaling = Literal["default", "llama3"]
ROPE_SCALINGS: tuple[RopeScaling, ...] = ("default", "llama3")
TokenizerKind = Literal["char", "bpe"]
TOKENIZERS: tuple[TokenizerKind, ...] = ("char", "bpe")
BPE_VOCAB = 512  # special tokens, 256 bytes and merges: a real tokenizer's behaviour at a tiny model's size
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII without the other whitespace kinds, plus newline: enough for math prompts.
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
VALID_HEAD_DIMS = (32, 64, 128)
# The spec's sizes, each at least 1 (and each a `make-tiny-model` option).
SIZES = (
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "intermediate",
    "max_positions",
    "vocab_multiple",
    "experts",
    "experts_per_token",
    "expert_intermediate",
)


@dataclass(frozen=True)
class TinyModelSpec:
    arch: Arch = "llama"
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 512
    max_positions: int = 512
    tie_embeddings: bool = False
    vocab_multiple: int = 64
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "default"  # llama3: Llama 3.x's scaling, its original context a quarter of ours
    tokenizer: TokenizerKind = "char"  # bpe: byte-level BPE trained on the tasks' texts, ChatML chat template
    # qwen3_moe: every layer's MLP is `experts` SwiGLU experts of width `expert_intermediate`, top
    # `experts_per_token` routed (probabilities renormalised); `intermediate` is then unused.
    experts: int = 4
    experts_per_token: int = 2
    expert_intermediate: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3" and self.arch != "llama":
            raise ConfigError(f"rope_scaling 'llama3' is Llama 3.x's; arch {self.arch!r} has plain RoPE")
        for name in SIZES:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.experts_per_token > self.experts:
            raise ConfigError(f"experts_per_token must be in [1, experts={self.experts}], got {self.experts_per_token}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.head_dim not in VALID_HEAD_DIMS:
            raise ConfigError(
                f"head_dim = hidden/heads = {self.head_dim}; vLLM's CPU attention accepts {VALID_HEAD_DIMS}"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vocab_size(self) -> int:
        n = len(SPECIAL_TOKENS) + len(CHARACTERS) if self.tokenizer == "char" else BPE_VOCAB
        return -(-n // self.vocab_multiple) * self.vocab_multiple


def char_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}


# GPT-2 byte-level symbols of the two whitespace characters; printable ASCII otherwise maps to itself.
_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a"}


def build_char_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """One token per character; BPE with no merges splits any text into its characters.

    The vocabulary is stored byte-level (space as `Ġ`, newline as `Ċ`) because transformers 5
    loads a `qwen2` checkpoint's tokenizer.json into Qwen2Tokenizer, which forces a byte-level
    pre-tokenizer and decoder whatever the file says: a plain character vocabulary then loses
    every space and newline. Token ids are those of `char_vocab()` either way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab()
    tok = Tokenizer(
        models.BPE(vocab={_BYTE_LEVEL.get(t, t): i for t, i in vocab.items()}, merges=[], unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tokenizer(spec: TinyModelSpec):  # -> transformers.PreTrainedTokenizerFast
    if spec.tokenizer == "char":
        return build_char_tokenizer()
    from engine.bpe_tokenizer import task_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(task_corpus(spec.seed), BPE_VOCAB)


def hf_config(spec: TinyModelSpec, tokenizer):  # -> transformers.PretrainedConfig
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {spec.vocab_size}")
    common = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling == "llama3":
        # The original context below ours, so that scaling changes the low and middle frequencies.
        rope |= {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        rope["original_max_position_embeddings"] = max(1, spec.max_positions // 4)
    if spec.arch == "llama":
        return LlamaConfig(**common, head_dim=spec.head_dim, rope_parameters=rope)
    if spec.arch == "qwen3":
        return Qwen3Config(**common, head_dim=spec.head_dim, rope_parameters=rope, use_sliding_window=False)
    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            head_dim=spec.head_dim,
            rope_parameters=rope,
            use_sliding_window=False,
            num_experts=spec.experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.expert_intermediate,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)


def write_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Write a randomly initialised model (seeded) and its tokenizer; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(hf_config(spec, tokenizer), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "timeshare_tiny_model.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out
