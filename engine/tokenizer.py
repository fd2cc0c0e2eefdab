"""The run's tokenisation: a model directory's tokenizer as the controller's `Tokens`, prompts
rendered through the model's chat template where `task.chat_template` asks (as TRL and verl do),
checked against the task's texts before anything starts.

Token ids are the trajectory: a partial rollout continues from its ids, never from decoded text,
which a BPE tokenizer need not encode back to the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from checkpoint_engine.contracts.config import ConfigError


@dataclass(frozen=True)
class Tokens:
    """The tokenizer's part the controller and the cold start need (plain callables: tests pass their own)."""

    encode: Callable[[str], list[int]]  # a prompt -> ids, special tokens (BOS, chat template) included
    encode_response: Callable[[str], list[int]]  # a response -> ids, no special tokens
    decode: Callable[[Sequence[int]], str]  # response ids -> text, special tokens dropped
    stop_ids: tuple[int, ...]  # a response ends at any of these (end of line, eos)
    pad_id: int


def load_tokens(model_dir: Path, stop: str, chat_template: bool, texts: Iterable[str]) -> Tokens:
    """`model_dir`'s tokenizer as `Tokens`; every text of the task (prompts, answers) must encode
    without an unknown token, and the chat template must render."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if chat_template and not tok.chat_template:
        raise ConfigError(
            f"task.chat_template=true, but the tokenizer of {model_dir} has no chat template "
            "(tokenizer_config.json or chat_template.jinja); set task.chat_template=false"
        )

    def plain(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def prompt(text: str) -> list[int]:
        if not chat_template:
            return tok(text)["input_ids"]
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return plain(rendered)  # the template writes every special token itself

    texts = list(texts)
    _check_vocabulary(tok, model_dir, texts, plain)
    if chat_template and texts:
        try:
            prompt(texts[0])
        except Exception as e:  # jinja raises its own kinds
            raise ConfigError(f"the chat template of {model_dir} fails to render a prompt: {e}") from None
    stop_ids = [tok.eos_token_id]
    if stop:
        ids = plain(stop)
        if len(ids) != 1:
            raise ConfigError(f"rollout.stop={stop!r} is {len(ids)} tokens for this tokenizer; it must be one")
        stop_ids.insert(0, ids[0])
    return Tokens(
        encode=prompt,
        encode_response=plain,
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
        stop_ids=tuple(stop_ids),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )


def _check_vocabulary(tok, model_dir: Path, texts: list[str], plain: Callable[[str], list[int]]) -> None:
    """A character the tokenizer maps to its unknown token loses the task's meaning: refuse it by name."""
    unk = tok.unk_token_id
    if unk is None:  # byte-level BPE: every text encodes
        return
    missing = sorted({c for c in set("".join(texts)) if unk in plain(c)})
    if missing:
        raise ConfigError(
            f"the tokenizer of {model_dir} has no token for {''.join(missing)!r}, which the task's texts use; "
            "give a model whose tokenizer covers them (a byte-level BPE covers every text)"
        )
