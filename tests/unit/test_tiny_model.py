"""The tiny local model: spec validation, the character tokenizer, and a checkpoint transformers loads."""

from __future__ import annotations

import json
import string
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.tiny_model import (
    CHARACTERS,
    SPECIAL_TOKENS,
    TinyModelSpec,
    build_char_tokenizer,
    char_vocab,
    write_tiny_model,
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hidden": 64, "heads": 4}, r"head_dim = hidden/heads = 16; vLLM"),
        ({"hidden": 512, "heads": 2}, r"head_dim = hidden/heads = 256; vLLM"),
        ({"heads": 8, "kv_heads": 3}, r"heads \(8\) must be a multiple of kv_heads \(3\)"),
        ({"hidden": 100, "heads": 8}, r"hidden \(100\) must be divisible by heads \(8\)"),
        ({"arch": "gpt2"}, "arch must be one of"),
        ({"layers": 0}, "layers must be >= 1"),
        ({"kv_heads": 0}, "kv_heads must be >= 1"),
        ({"vocab_multiple": 0}, "vocab_multiple must be >= 1"),
    ],
)
def test_spec_rejects(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**options)


@pytest.mark.parametrize(
    "options",
    [{}, {"hidden": 64, "heads": 2, "kv_heads": 1}, {"hidden": 128, "heads": 4, "kv_heads": 4}, {"arch": "qwen2"}],
)
def test_spec_accepts(options: dict) -> None:
    spec = TinyModelSpec(**options)
    assert spec.head_dim * spec.heads == spec.hidden


@pytest.mark.parametrize("multiple", [1, 7, 64, 128, 256])
def test_vocab_size_is_padded_multiple(multiple: int) -> None:
    n_tokens = len(char_vocab())
    size = TinyModelSpec(vocab_multiple=multiple).vocab_size
    assert size % multiple == 0
    assert n_tokens <= size < n_tokens + multiple


def test_char_vocab_covers_specials_and_characters() -> None:
    vocab = char_vocab()
    assert len(vocab) == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for c in string.digits + string.ascii_letters + string.punctuation + " \n":
        assert c in vocab


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


ROUND_TRIP = [
    "12+34=46",
    "sort:3,1,2=123",
    "Hello, world! (x) [y] {z} <a> ~`|\\ ^_@#$%&*'\"?;:",
    "  two  spaces, trailing ",
    "line one\nline two\n\n",
    "".join(CHARACTERS),
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_one_token_per_character_after_bos(tokenizer, text: str) -> None:
    vocab = char_vocab()
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == vocab["<s>"]
    assert ids[1:] == [vocab[c] for c in text]


def test_tokenizer_special_ids(tokenizer) -> None:
    vocab = char_vocab()
    assert tokenizer.eos_token_id == vocab["</s>"]
    assert tokenizer.pad_token_id == vocab["<pad>"]
    assert tokenizer.unk_token_id == vocab["<unk>"]
    assert tokenizer("a\tb")["input_ids"] == [vocab["<s>"], vocab["a"], vocab["<unk>"], vocab["b"]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_write_tiny_model_loads_in_transformers(tmp_path: Path, tokenizer, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = TinyModelSpec(arch=arch, layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64)
    out = write_tiny_model(tmp_path / "model", spec)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "timeshare_tiny_model.json").read_text()) == asdict(spec)

    # transformers 5 loads a qwen2 tokenizer as Qwen2Tokenizer (forced byte-level): spaces and newlines must survive.
    loaded_tok = AutoTokenizer.from_pretrained(out)
    text = "12 + 34 = 46\nsort:3,1=13\n" + "".join(CHARACTERS)
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(loaded_tok(text)["input_ids"], skip_special_tokens=True) == text
    vocab = char_vocab()
    assert loaded_tok.decode([vocab["4"], vocab["2"], vocab["\n"], vocab[" "]]) == "42\n "

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.vocab_size == spec.vocab_size
    assert model.config.num_hidden_layers == 1
    assert model.config.num_key_value_heads == 1
    assert model.config.eos_token_id == vocab["</s>"]
    ids = torch.tensor([loaded_tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, len(text) + 1, spec.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("options", "architecture"),
    [({"arch": "qwen3"}, "Qwen3ForCausalLM"), ({"rope_scaling": "llama3"}, "LlamaForCausalLM")],
)
def test_each_family_is_written_as_the_trainer_reads_it(tmp_path: Path, options: dict, architecture: str) -> None:
    from sidecars.megatron.arch import ModelArch

    spec = TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64, max_positions=128, **options)
    arch = ModelArch.from_pretrained(write_tiny_model(tmp_path, spec))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    assert arch.qk_norm == (spec.arch == "qwen3")
    assert (arch.rope_scaling is not None) == (spec.rope_scaling == "llama3")
    if arch.rope_scaling is not None:
        assert arch.rope_scaling.original_max_positions == 32


def test_llama3_rope_scaling_is_refused_for_qwen() -> None:
    with pytest.raises(ValueError, match=r"rope_scaling 'llama3' is Llama 3\.x's; arch 'qwen3'"):
        TinyModelSpec(arch="qwen3", rope_scaling="llama3")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_bpe_model_directory_loads_the_tokenizer_it_was_written_with(tmp_path: Path, arch: str) -> None:
    """transformers loads a qwen2 directory's tokenizer with Qwen2's own pre-tokenizer: the BPE is
    trained under the same one, so every family encodes as the trained tokenizer does."""
    from transformers import AutoTokenizer

    from engine.bpe_tokenizer import task_corpus, train_bpe_tokenizer

    spec = TinyModelSpec(arch=arch, tokenizer="bpe", layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64)
    loaded = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path, spec))
    trained = train_bpe_tokenizer(task_corpus(spec.seed), 512)
    text = "12345 + 67890 = 80235\nsort: 3,1,2 -> carry the one"
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == spec.vocab_size >= len(loaded)
    assert loaded.bos_token_id is None
