"""Answer extraction and comparison of `engine.tasks.math_verify`, GSM8K / MATH style."""

from __future__ import annotations

from fractions import Fraction

import pytest

from engine.tasks.math_verify import answers_match, extract_answer, math_reward, to_number

MINUS = "\u2212"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed{}: nested braces kept whole, the last box wins, \fbox too.
        (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{x^{2}+1}", "x^{2}+1"),
        (r"first \boxed{3}, then on reflection \boxed{4}", "4"),
        (r"\fbox{ 7 }", "7"),
        (r"#### 3 but really \boxed{4}", "4"),
        # Unbalanced: no answer, not a truncated or guessed one (not even a number inside the box).
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed{5} and then \boxed{6", None),
        # GSM8K's "#### x" tail: up to the end of its line.
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
        ("#### 42\nsome trailing chatter 99", "42"),
        ("#### $18", "$18"),
        # <answer> tags, last one wins.
        ("<answer> Paris </answer>", "Paris"),
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),
        ("<answer>\n12\n</answer>", "12"),
        # Fallback: the last number in the text.
        ("I had 3 apples and bought 7 more.", "7"),
        ("The answer is 3, so we are done.", "3"),
        ("It comes to 1,234 apples", "1,234"),
        ("it costs $18.50.", "18.50"),
        ("The answer is 1,2.", "1,2"),
        (f"the answer is {MINUS}5", f"{MINUS}5"),
        ("half is 1/2", "1/2"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", Fraction(5)),
        ("+5", Fraction(5)),
        (f"{MINUS}5", Fraction(-5)),
        ("-0", Fraction(0)),
        ("  7 \n", Fraction(7)),
        ("$5", Fraction(5)),
        ("$-5", Fraction(-5)),
        (r"\$5", Fraction(5)),
        (r"\$1,000.50", Fraction(2001, 2)),
        ("50%", Fraction(50)),
        (r"50\%", Fraction(50)),
        ("3.", Fraction(3)),
        ("1,234", Fraction(1234)),
        ("12,345,678", Fraction(12345678)),
        ("1,234.5", Fraction(2469, 2)),
        (r"\frac{1}{2}", Fraction(1, 2)),
        (r"\dfrac{3}{4}", Fraction(3, 4)),
        (r"\tfrac{3}{4}", Fraction(3, 4)),
        (r"-\frac{1}{2}", Fraction(-1, 2)),
        ("1/2", Fraction(1, 2)),
        (" 1 / 2 ", Fraction(1, 2)),
        (".5", Fraction(1, 2)),
        ("0.50", Fraction(1, 2)),
        (r"\text{5}", Fraction(5)),
        (r"\left(3\right)", Fraction(3)),
        # Not numbers: misplaced commas, words, division by zero, nothing.
        ("1,2", None),
        ("12,34", None),
        ("1,23,456", None),
        ("abc", None),
        ("x+1", None),
        ("3/0", None),
        ("", None),
    ],
)
def test_to_number(text: str, expected: Fraction | None) -> None:
    assert to_number(text) == expected


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac{1}{4}", "0.25"),
        ("1,234", "1234"),
        ("1234", "1,234"),
        ("+5", "5"),
        (f"{MINUS}5", "-5"),
        ("-0", "0"),
        (" 42 \n", "42"),
        ("$18", "18"),
        (r"\$18.00", "18"),
        ("50%", "50"),
        ("7.", "7"),
        ("Paris", "paris"),
        (" New  York ", "new york"),
        (r"\text{Paris}", "Paris"),
        ("Paris.", "Paris"),
    ],
)
def test_answers_match(predicted: str, reference: str) -> None:
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("0.33", "1/3"),
        ("12", "1,2"),
        ("1,2", "12"),
        ("5", "-5"),
        ("0.5", "5"),
        ("Paris", "London"),
        (None, "5"),
    ],
)
def test_answers_do_not_match(predicted: str | None, reference: str) -> None:
    assert not answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        (r"Thus the answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
        (r"The price is \boxed{\$18.90}.", "18.9", 1.0),
        ("48/2 = 24 in May, 48+24 = 72 in all.\n#### 1,234", "1234", 1.0),
        ("She has 5 apples, buys 3 more, 8 in all.", "8", 1.0),
        ("The answer is 3, so we are done.", "3", 1.0),
        (f"It is {MINUS}5.", "-5", 1.0),
        ("<answer>PARIS</answer>", "paris", 1.0),
        ("I think it's 7.", "8", 0.0),
        ("The answer is 1,2.", "12", 0.0),
        (r"\boxed{\frac{1}{2}", "2", 0.0),
        ("no idea", "5", 0.0),
    ],
)
def test_math_reward(response: str, reference: str, expected: float) -> None:
    assert math_reward(response, reference) == expected
