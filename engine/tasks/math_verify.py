"""Math answer extraction and comparison, GSM8K / MATH style.

`extract_answer` prefers `\\boxed{...}` (last one, nested braces allowed), then `#### x`,
then `<answer>..</answer>`, then the last number in the text. `answers_match` compares
numerically when both sides are numbers (commas, signs, `$`, `%`, fractions and `\\frac`
normalised), else as whitespace-free strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

UNICODE_MINUS = "\u2212"  # what LaTeX-to-text and some datasets use for a sign
# Commas only between digits, so "is 3, so" gives "3" and "1,234" stays whole.
_NUMBER = re.compile(r"[-+\u2212]?\s*(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no answer rather than a truncated one


def extract_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "\\boxed{" in text or "\\fbox{" in text:
        return None  # a box that never closes is malformed; the fallbacks below would guess a number inside it
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if tagged:
        return tagged[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def to_number(text: str) -> Fraction | None:
    """Parse `text` as an exact rational, or None when it is not a plain number."""
    # MATH escapes dollars inside LaTeX ("\\$18.90"); a `$` is never part of a number.
    s = text.replace("\\$", "").replace("$", "").strip()
    s = s.replace("\\!", "").replace("\\,", "").replace(UNICODE_MINUS, "-").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = s.replace(" ", "").rstrip(".")
    if s.endswith(("\\%", "%")):
        s = s.rstrip("%").rstrip("\\")
    s = s.replace("(", "").replace(")", "")
    # Thousands separators only where they really are ones ("1,234", not "1,2").
    if "," in s:
        if not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
            return None
        s = s.replace(",", "")
    if s.startswith("+"):
        s = s[1:]
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_text(text: str) -> str:
    s = text.strip().strip("$").strip().rstrip(".")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return re.sub(r"\s+", "", s).lower()


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_text(predicted) == normalize_text(reference)


def math_reward(response: str, reference: str) -> float:
    return 1.0 if answers_match(extract_answer(response), reference) else 0.0
