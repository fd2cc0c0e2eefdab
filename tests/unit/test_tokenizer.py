"""The run's tokenisation (`engine.tokenizer`) on the two tiny tokenizers: the char one and the
byte-level BPE with its ChatML template (`engine.bpe_tokenizer`), and the refusals before a start."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_engine.contracts.config import ConfigError
from engine.bpe_tokenizer import IM_END, IM_START, task_corpus, train_bpe_tokenizer
from engine.tiny_model import build_char_tokenizer
from engine.tokenizer import load_tokens


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(task_corpus(0, per_task=300), 512).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("char")
    build_char_tokenizer().save_pretrained(out)
    return out


def test_bpe_merges_characters_and_round_trips_any_text(bpe_dir: Path) -> None:
    tokens = load_tokens(bpe_dir, "\n", chat_template=False, texts=["12+34="])
    text = "sort: 3,1,2 -> 1,2,3\ncarry 1, then 46 ünïcödé"
    ids = tokens.encode(text)
    assert len(ids) < len(text.encode()), "no merge applied"
    assert tokens.decode(ids) == text
    assert tokens.encode_response("46\n")[-1] == tokens.stop_ids[0]


def test_bpe_ids_need_not_survive_decoding_piecewise(bpe_dir: Path) -> None:
    """Why partial rollouts continue by ids: text cut mid-merge and encoded again gives other ids."""
    tokens = load_tokens(bpe_dir, "\n", chat_template=False, texts=[])
    whole = tokens.encode_response("sort: 3,1,2 ->")
    pieces = tokens.encode_response("so") + tokens.encode_response("rt: 3,1,2 ->")
    assert tokens.decode(pieces) == tokens.decode(whole)
    assert pieces != whole


def test_the_chat_template_renders_each_prompt_as_a_user_turn(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokens = load_tokens(bpe_dir, "\n", chat_template=True, texts=["1+2="])
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    ids = tokens.encode("1+2=")
    assert tok.decode(ids) == f"{IM_START}user\n1+2={IM_END}\n{IM_START}assistant\n"
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 2
    assert tokens.stop_ids == (tok("\n", add_special_tokens=False)["input_ids"][0], tok.convert_tokens_to_ids(IM_END))


def test_the_char_tokenizer_adds_bos_to_prompts_only(char_dir: Path) -> None:
    tokens = load_tokens(char_dir, "\n", chat_template=False, texts=["1+2="])
    assert tokens.encode("12")[1:] == tokens.encode_response("12")
    assert len(tokens.encode_response("12")) == 2


def test_a_tokenizer_without_a_template_is_refused_by_name(char_dir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"task.chat_template=true, but the tokenizer of {char_dir} has no chat"):
        load_tokens(char_dir, "\n", chat_template=True, texts=["1+2="])


def test_characters_the_tokenizer_lacks_are_named(char_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no token for 'é€', which the task's texts use"):
        load_tokens(char_dir, "\n", chat_template=False, texts=["1+2=", "café: 3€"])


def test_a_template_that_fails_to_render_is_refused(bpe_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bpe_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    template = broken / "chat_template.jinja"  # where transformers 5 keeps it
    assert "im_start" in template.read_text()
    template.write_text("{{ raise_exception('no system prompt given') }}")
    with pytest.raises(ConfigError, match="fails to render a prompt: no system prompt given"):
        load_tokens(broken, "\n", chat_template=True, texts=["1+2="])
