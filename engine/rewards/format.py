"""The format rewards: does a response read `<think>...</think><answer>...</answer>` (`format`),
or reason inside `<think>...</think>` and then answer (`think`, DeepSeek-R1's layout)?

Consumes a response string; produces 1.0 / 0.0 and, for a well-formed response, its answer text.
Well-formed (`format`) means exactly one of each tag, in that order, with only whitespace before `<think>`,
between `</think>` and `<answer>`, and after `</answer>`. `think` asks for one `<think>` with only
whitespace before it, one `</think>`, reasoning between them and an answer (any text, a `\boxed{}`
for math) after. With `think_in_prompt` the chat template already opened `<think>` at the end of the
prompt, so the response must not open it again.
"""

from __future__ import annotations

import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FULL = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", flags=re.DOTALL)
_OPENED = re.compile(r"(.*?)</think>\s*<answer>(.*?)</answer>\s*", flags=re.DOTALL)
_THINK = re.compile(r"\s*<think>(.*)</think>(.*)", flags=re.DOTALL)
_THINK_OPENED = re.compile(r"(.*)</think>(.*)", flags=re.DOTALL)


def _match(response: str, think_in_prompt: bool) -> re.Match[str] | None:
    expected = dict.fromkeys(TAGS, 1)
    if think_in_prompt:
        expected["<think>"] = 0
    # The regex alone would accept a stray tag inside the think or answer text.
    if any(response.count(tag) != count for tag, count in expected.items()):
        return None
    return (_OPENED if think_in_prompt else _FULL).fullmatch(response)


def format_reward(response: str, *, think_in_prompt: bool = False) -> float:
    """1.0 when `response` is well-formed (see the module docstring), else 0.0."""
    return 1.0 if _match(response, think_in_prompt) else 0.0


def extract_tagged_answer(response: str, *, think_in_prompt: bool = False) -> str | None:
    """The stripped text inside `<answer>..</answer>` of a well-formed response, else None."""
    m = _match(response, think_in_prompt)
    return m.group(2).strip() if m else None


def think_reward(response: str, *, think_in_prompt: bool = False) -> float:
    """1.0 when `response` reasons inside `<think>...</think>` and answers after it, else 0.0."""
    if response.count("<think>") != (0 if think_in_prompt else 1) or response.count("</think>") != 1:
        return 0.0
    m = (_THINK_OPENED if think_in_prompt else _THINK).fullmatch(response)
    return 1.0 if m and m.group(1).strip() and m.group(2).strip() else 0.0
