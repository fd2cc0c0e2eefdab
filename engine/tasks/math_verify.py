"""Math answers checked by HF's `math-verify` (the verifier TRL and open-r1 use).

The library finds a response's final answer (the last `\\boxed{}`, else the last number or
expression), parses LaTeX into SymPy and decides equivalence: 1/2 = 0.5 = \\frac{2}{4},
(x+1)^2 = x^2+2x+1, 1,234 = 1234, 50% = 50, sets, intervals, `x=3` = 3. What it lacks stays here:
a reference's GSM8K `#### x` tail and MATH solution box (`reference_answer`), the `<answer>` tags of
the format layout, and word answers, which it reads as products of symbols (`odd` = d**2*o, so any
anagram would match): those compare as text.

Its parser and comparer guard themselves with SIGALRM (a LaTeX expression can make SymPy run for
minutes), which Python allows on the main thread only; elsewhere they run without that guard.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

PARSE_SECONDS = 5  # per parse and per comparison, on the main thread
_TAGGED = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
_WORDS = re.compile(r"[a-z][a-z '\-]*[a-z]")
_TEXT = re.compile(r"\\text\{(.*?)\}")


def _seconds() -> int | None:
    return PARSE_SECONDS if threading.current_thread() is threading.main_thread() else None


def _last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{}` (nested braces kept whole), None when absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def reference_answer(raw: str) -> str:
    """The answer a dataset's reference field states: GSM8K's `#### x` tail (up to its line's end),
    else a MATH solution's last box, else the whole field."""
    if "####" in raw:
        return raw.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    boxed = _last_boxed(raw)
    return (boxed if boxed is not None else raw).strip()


def _final_answer(text: str) -> tuple[list | None, str | None]:
    """The library's parse of `text`'s final answer (None for `<answer>` text, which it cannot read)
    and that answer as text (None when there is none)."""
    tagged = _TAGGED.findall(text)
    if tagged:
        return None, tagged[-1].strip()
    found = parse(text, parsing_timeout=_seconds())
    return (found, str(found[-1]).strip()) if found else (None, None)


def extract_answer(text: str) -> str | None:
    """The final answer `text` states as the reward reads it: the last `<answer>` text, else the
    library's (the last box, else the last number or expression); None when there is none."""
    return _final_answer(text)[1]


def _as_words(text: str) -> str | None:
    """`text` lowercased without `\\text{}`, `$`, spaces at the ends or a final period when it is
    words (two letters or more, nothing but letters, spaces, apostrophes and hyphens)."""
    s = _TEXT.sub(r"\1", text).strip().strip("$").strip().rstrip(".").lower()
    s = re.sub(r"\s+", " ", s)
    return s if _WORDS.fullmatch(s) else None


def answers_match(predicted: str | None, reference: str, parsed: list | None = None) -> bool:
    """Whether `predicted` (already parsed as `parsed` when given) states `reference`'s answer."""
    if predicted is None:
        return False
    words = _as_words(reference)
    if words is not None:
        return _as_words(predicted) == words
    gold = parse(f"${reference}$", parsing_timeout=_seconds())
    answer = parsed or parse(f"${predicted}$", parsing_timeout=_seconds())
    return bool(gold and answer) and verify(gold, answer, timeout_seconds=_seconds())


def math_reward(response: str, reference: str) -> float:
    parsed, answer = _final_answer(response)
    return 1.0 if answers_match(answer, reference, parsed) else 0.0
