"""The math reward of `engine.tasks.math_verify`: math-verify's equivalence, and what it lacks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from engine.tasks.jsonl import PRESETS
from engine.tasks.math_verify import answers_match, extract_answer, math_reward, reference_answer

MINUS = "\u2212"
DATA = Path(__file__).resolve().parents[2] / "engine/tasks/data"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
        ("#### 42\nsome trailing chatter 99", "42"),
        (r"so $x = \boxed{\frac{1}{2}}$, not \boxed{3}... wait: \boxed{x^{2}+1}", "x^{2}+1"),
        (r"\boxed{\frac{1}{2}", r"\boxed{\frac{1}{2}"),  # an unclosed box is not an answer: the field is kept
        (" 17 ", "17"),
    ],
)
def test_reference_answer(raw: str, expected: str) -> None:
    assert reference_answer(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"first \boxed{3}, then on reflection \boxed{4}", "3,4"),  # every box: a hedge states a set
        ("<answer> Paris </answer>", "Paris"),  # the library finds nothing inside tags
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),
        ("I had 3 apples and bought 7 more.", "7"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{4}", "0.25"),
        ("1,234", "1234"),
        (f"{MINUS}5", "-5"),
        (r"\$18.00", "18"),
        ("50%", "50"),
        # Symbolic equivalence, which the hand-written comparer never had.
        ("(x+1)^2", "x^2+2x+1"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"\{2, 1\}", r"\{1, 2\}"),
        ("[1,3)", "[1, 3)"),
        ("x = 3", "3"),
        # Word answers compare as text.
        ("Paris", "paris"),
        (r"\text{ New  York }", "new york"),
        ("C", "C"),
    ],
)
def test_answers_match(predicted: str, reference: str) -> None:
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("0.33", "1/3"),
        ("12", "1,2"),
        ("5", "-5"),
        ("(x+1)^2", "x^2+1"),
        ("[1,3]", "[1,3)"),
        ("Sipar", "Paris"),  # the library alone reads both as p*a*r*i*s
        ("London", "Paris"),
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
        ("<think>3 and 4 make 7</think> The total is \\boxed{7}.", "7", 1.0),
        ("<answer>PARIS</answer>", "paris", 1.0),
        ("I think it's 7.", "8", 0.0),
        (r"either \boxed{3} or \boxed{4}", "4", 0.0),
        ("The answer is 1,2.", "12", 0.0),
        ("no idea", "5", 0.0),
    ],
)
def test_math_reward(response: str, reference: str, expected: float) -> None:
    assert math_reward(response, reference) == expected


def test_the_reward_runs_off_the_main_thread() -> None:
    """The library's SIGALRM guard is for the main thread only; elsewhere it runs unguarded, not failing."""
    got: list[float] = []
    worker = threading.Thread(target=lambda: got.append(math_reward(r"\boxed{\frac{2}{4}}", "0.5")))
    worker.start()
    worker.join()
    assert got == [1.0]


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_each_example_record_earns_its_own_reward(name: str) -> None:
    """The project's example records: each worked solution states the answer its reference field gives."""
    preset = PRESETS[name]
    records = [json.loads(line) for line in (DATA / f"{name}_example.jsonl").read_text().splitlines()]
    assert len(records) >= 20
    for record in records:
        solution = record[preset.answer_key]
        assert math_reward(solution, reference_answer(solution)) == 1.0, record
