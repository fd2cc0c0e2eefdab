"""A byte-level BPE tokenizer trained here with the `tokenizers` library (nothing is downloaded),
shaped like Qwen's: ChatML special tokens and chat template, no BOS, `<|im_end|>` ending a turn.

It stands in for a real model's tokenizer in tests and tiny runs: merges span characters, so a
text's tokens depend on their neighbours, and a decoded-then-encoded trajectory need not give back
its ids (partial rollouts must continue by ids). Any byte sequence encodes (the 256 bytes are the
initial alphabet), so no text is out of vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

# Qwen2's pre-tokenization (digits one by one, words, punctuation runs, whitespace): transformers loads
# a qwen2 checkpoint's tokenizer with it whatever tokenizer.json says, so the merges are learnt under it.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
# ChatML, as Qwen2.5 and Qwen3 render it (without their tool and reasoning branches).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    """Train on `corpus`; the vocabulary holds the special tokens, the 256 bytes and up to
    `vocab_size` - 259 merges (fewer when the corpus has no more pairs to merge)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )


def task_corpus(seed: int, per_task: int = 2000) -> list[str]:
    """Prompts, worked answers and answers of the built-in tasks: what a tiny model reads and writes."""
    from engine.tasks import make_task

    texts: list[str] = []
    for name in ("scratchpad", "addition", "sort"):
        for s in make_task(name).samples("train", per_task, seed):
            texts.append(s.prompt + (s.demonstration or s.answer) + "\n")
    return texts
