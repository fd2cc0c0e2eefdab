"""The format reward: does a response read `<think>...</think><answer>...</answer>`?

Consumes a response string; produces 1.0 / 0.0 and, for a well-formed response, its answer text.
Well-formed means exactly one of each tag, in that order, with only whitespace before `<think>`,
between `</think>` and `<answer>`, and after `</answer>`. With `think_in_prompt` the chat template
already opened `<think>` at the end of the prompt, so the response must not open it again.
"""

from __future__ import annotations

import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FULL = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", flags=re.DOTALL)
_OPENED = re.compile(r"(.*?)</think>\s*<answer>(.*?)</answer>\s*", flags=re.DOTALL)


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
