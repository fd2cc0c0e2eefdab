"""The verifiable tasks: seeded samples, disjoint splits, rewards and option errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.tasks import TASKS, AdditionTask, JsonlTask, Sample, ScratchpadTask, SortTask, make_task
from engine.tasks.base import partial_credit, split_of
from engine.tasks.scratchpad import stated_answer, worked_sum


def uids(samples: list[Sample]) -> list[str]:
    return [s.uid for s in samples]


def operands(sample: Sample) -> tuple[int, int]:
    a, b = sample.prompt.removesuffix("=").split("+")
    return int(a), int(b)


def digits_of(sample: Sample) -> list[int]:
    return [int(d) for d in sample.prompt.removeprefix("sort:").removesuffix("=").split(",")]


GENERATED = [
    pytest.param(lambda: AdditionTask(max_digits=2), id="addition"),
    pytest.param(lambda: SortTask(min_len=3, max_len=5), id="sort"),
    pytest.param(lambda: ScratchpadTask(max_digits=4), id="scratchpad"),
]


# --- addition and sort: samples and splits ---


@pytest.mark.parametrize("make", GENERATED)
def test_same_seed_same_samples(make) -> None:
    assert make().samples("train", 50, seed=7) == make().samples("train", 50, seed=7)


@pytest.mark.parametrize("make", GENERATED)
def test_different_seed_different_samples(make) -> None:
    task = make()
    assert uids(task.samples("train", 50, seed=1)) != uids(task.samples("train", 50, seed=2))


@pytest.mark.parametrize("make", GENERATED)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_n_distinct_samples(make, split: str) -> None:
    samples = make().samples(split, 200, seed=0)
    assert len(samples) == 200
    assert len(set(uids(samples))) == 200
    assert len({s.prompt for s in samples}) == 200


@pytest.mark.parametrize("make", GENERATED)
def test_zero_samples(make) -> None:
    assert make().samples("train", 0, seed=0) == []


@pytest.mark.parametrize("make", GENERATED)
def test_train_and_heldout_disjoint_across_seeds(make) -> None:
    task = make()
    train = {u for seed in range(3) for u in uids(task.samples("train", 1500, seed))}
    heldout = {u for seed in range(3) for u in uids(task.samples("heldout", 300, seed))}
    assert len(train) > 1500
    assert len(heldout) > 300
    assert not train & heldout


@pytest.mark.parametrize(("max_digits", "n_train", "n_heldout"), [(1, 80, 5), (3, 300, 100)])
def test_addition_answers_are_sums(max_digits: int, n_train: int, n_heldout: int) -> None:
    task = AdditionTask(max_digits=max_digits)
    for s in task.samples("train", n_train, seed=0) + task.samples("heldout", n_heldout, seed=0):
        a, b = operands(s)
        assert 0 <= a < 10**max_digits
        assert 0 <= b < 10**max_digits
        assert s.answer == str(a + b)
        assert s.difficulty == max(len(str(a)), len(str(b)))


def test_addition_reaches_max_digits() -> None:
    samples = AdditionTask(max_digits=4).samples("train", 200, seed=0)
    assert max(s.difficulty for s in samples) == 4


def _columns_add_up(demonstration: str, a: int, b: int) -> None:
    """Each column `x+y[+1]=s` takes the operands' digits from the right, the carry of the column before,
    and the sum after `#` is the column sums' last digits with the final carry."""
    steps, _, answer = demonstration.partition("#")
    carry, digits = 0, []
    for i, step in enumerate(steps.split(";")):
        terms, total = step.split("=")
        parts = [int(t) for t in terms.split("+")]
        assert parts[:2] == [a // 10**i % 10, b // 10**i % 10]
        assert parts[2:] == ([1] if carry else [])
        assert int(total) == sum(parts)
        carry, digits = int(total) // 10, [int(total) % 10, *digits]
    assert answer == str(a + b) == str(int(("1" if carry else "") + "".join(map(str, digits))))


def test_scratchpad_demonstrations_work_the_columns() -> None:
    task = ScratchpadTask(max_digits=6)
    samples = task.samples("train", 400, seed=0) + task.samples("heldout", 50, seed=0)
    for s in samples:
        a, b = operands(s)
        assert s.answer == str(a + b)
        assert s.difficulty == max(len(str(a)), len(str(b))) == s.demonstration.count(";") + 1
        _columns_add_up(s.demonstration, a, b)
        assert task.reward(s.demonstration, s) == 1.0
    assert worked_sum(47, 385) == "7+5=12;4+8+1=13;0+3+1=4#432"


def test_scratchpad_lengths_have_a_long_tail() -> None:
    samples = ScratchpadTask(max_digits=6).samples("train", 4000, seed=0)
    lengths = sorted(len(s.demonstration) for s in samples)
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert p99 > 2 * median  # a few take many columns
    columns = [s.difficulty for s in samples]
    assert columns.count(2.0) > columns.count(4.0) > columns.count(6.0) > 0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("7+5=12;4+8+1=13#132", 1.0),
        ("#132", 1.0),
        ("7+5=12#99#132", 1.0),  # the last `#` states the answer
        ("7+5=12;4+8+1=13#133", 0.5 * 2 / 3),  # partial: two of three digits, aligned from the right
        ("7+5=12;4+8+1=13", 0.0),  # no answer stated
        ("132", 0.0),
        ("#", 0.0),
        ("\n#132", 0.0),
    ],
)
def test_scratchpad_reward_reads_the_answer_after_the_mark(response: str, expected: float) -> None:
    sample = Sample(uid="pad:47+85", prompt="47+85=", answer="132")
    assert ScratchpadTask().reward(response.replace("\\n", "\n"), sample) == pytest.approx(expected)
    assert ScratchpadTask(reward_kind="exact").reward(response, sample) == float(expected == 1.0)
    assert stated_answer("1+1=2#2\n#3") == "2"


@pytest.mark.parametrize(
    ("task", "response", "answer"),
    [
        (AdditionTask(), " 42 \nmore", "42"),
        (AdditionTask(), "\n42", None),
        (SortTask(), "123", "123"),
        (ScratchpadTask(), "2+4=6;1+3=4#46\n", "46"),
        (ScratchpadTask(), "2+4=6;1+3=4", None),
    ],
)
def test_tasks_state_the_answer_their_reward_reads(task, response: str, answer: str | None) -> None:
    assert task.answer(response) == answer


def test_sort_answers_are_sorted_digits() -> None:
    task = SortTask(min_len=2, max_len=7)
    samples = task.samples("train", 300, seed=0) + task.samples("heldout", 100, seed=0)
    for s in samples:
        digits = digits_of(s)
        assert 2 <= len(digits) <= 7
        assert s.answer == "".join(map(str, sorted(digits)))
        assert s.difficulty == len(digits)
    assert {len(digits_of(s)) for s in samples} == set(range(2, 8))


# --- rewards ---


ADD = Sample(uid="add:17+25", prompt="17+25=", answer="42")
SORT = Sample(uid="sort:3,1,2", prompt="sort:3,1,2=", answer="123")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("42", 1.0),
        (" 42 ", 1.0),
        ("42\n17+25=42 because 7+5=12", 1.0),
        ("43", 0.0),
        ("4", 0.0),
        ("420", 0.0),
        ("", 0.0),
        ("\n42", 0.0),
        ("42 is the answer", 0.0),
    ],
)
def test_addition_reward(response: str, expected: float) -> None:
    assert AdditionTask().reward(response, ADD) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [("123", 1.0), ("123\nsorted!", 1.0), ("132", 0.0), ("12", 0.0), ("1234", 0.0), ("", 0.0)],
)
def test_sort_exact_reward(response: str, expected: float) -> None:
    assert SortTask(reward_kind="exact").reward(response, SORT) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("123", 1.0),
        ("123\n321", 1.0),
        ("132", 1 / 3),  # only the 1 in place
        ("321", 1 / 3),  # only the 2 in place
        ("12", 2 / 3),  # a missing position counts as a miss
        ("1234", 3 / 4),  # an extra character counts against it
        ("999", 0.0),
        ("", 0.0),
    ],
)
def test_sort_partial_reward(response: str, expected: float) -> None:
    assert SortTask(reward_kind="partial").reward(response, SORT) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("got", "want", "expected"),
    [("1124", "1123", 3 / 4), ("0011", "0011", 1.0), ("1", "0011", 0.0), ("0", "0011", 1 / 4), ("", "", 1.0)],
)
def test_partial_credit(got: str, want: str, expected: float) -> None:
    assert partial_credit(got, want) == pytest.approx(expected)


@pytest.mark.parametrize("make", GENERATED)
def test_reference_answers_earn_full_reward(make) -> None:
    task = make()
    for s in task.samples("heldout", 50, seed=3):
        assert task.reward((s.demonstration or s.answer) + "\n", s) == 1.0
        assert task.reward(s.answer + "9", s) < 1.0


# --- errors ---


def test_addition_too_many_samples() -> None:
    message = r"addition\(max_digits=1, 100 pairs\) cannot give 100 distinct heldout samples"
    with pytest.raises(ValueError, match=message):
        AdditionTask(max_digits=1).samples("heldout", 100, seed=0)


def test_sort_too_many_samples() -> None:
    # Length 1 has ten prompts in all, shared between the splits.
    with pytest.raises(ValueError, match=r"sort\(min_len=1, max_len=1\) cannot give 11 distinct train samples"):
        SortTask(min_len=1, max_len=1).samples("train", 11, seed=0)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: AdditionTask(max_digits=0), "max_digits"),
        (lambda: AdditionTask(max_digits=10), "max_digits"),
        (lambda: AdditionTask(heldout_fraction=0.0), "heldout_fraction"),
        (lambda: AdditionTask(heldout_fraction=1.0), "heldout_fraction"),
        (lambda: SortTask(min_len=0), "min_len"),
        (lambda: SortTask(min_len=5, max_len=4), "min_len"),
        (lambda: SortTask(max_len=33), "max_len"),
        (lambda: SortTask(reward_kind="fuzzy"), "reward_kind"),
        (lambda: SortTask(heldout_fraction=1.5), "heldout_fraction"),
    ],
)
def test_invalid_options(make, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        make()


@pytest.mark.parametrize("make", GENERATED)
def test_invalid_split(make) -> None:
    with pytest.raises(ValueError, match="split"):
        make().samples("test", 5, seed=0)


@pytest.mark.parametrize("make", GENERATED)
def test_negative_count(make) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        make().samples("train", -1, seed=0)


def test_make_task_builds_with_options() -> None:
    task = make_task("sort", min_len=2, max_len=2, reward_kind="partial")
    assert isinstance(task, SortTask)
    assert (task.min_len, task.max_len, task.reward_kind) == (2, 2, "partial")


def test_make_task_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        make_task("nope")
    for name in TASKS:
        assert name in str(err.value)


# --- jsonl ---


N_GSM8K = 60
GSM8K_TEMPLATE = "Question: {prompt}\nPut the final answer in \\boxed{}."


def gsm8k_records() -> list[dict]:
    records = [
        {
            "question": f"Tom has {i} apples and buys {i} more. How many?",
            "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>\n#### {2 * i}",
        }
        for i in range(N_GSM8K - 1)
    ]
    records.append({"question": "How many pages in all?", "answer": "617 * 2 = 1234\n#### 1,234"})
    return records


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def gsm8k_path(tmp_path: Path) -> Path:
    lines = [json.dumps(r) for r in gsm8k_records()]
    lines.insert(10, "   ")  # blank lines are skipped
    return write_jsonl(tmp_path / "gsm8k.jsonl", lines)


def expected_split_sizes(questions: list[str], fraction: float) -> tuple[int, int]:
    heldout = sum(split_of(q, fraction) == "heldout" for q in questions)
    return len(questions) - heldout, heldout


def all_samples(task: JsonlTask, questions: list[str]) -> dict[str, list[Sample]]:
    n_train, n_heldout = expected_split_sizes(questions, task.heldout_fraction)
    return {"train": task.samples("train", n_train, seed=0), "heldout": task.samples("heldout", n_heldout, seed=0)}


def test_jsonl_gsm8k_loads_and_splits(gsm8k_path: Path) -> None:
    task = JsonlTask(path=str(gsm8k_path), prompt_key="question", heldout_fraction=0.3)
    questions = [r["question"] for r in gsm8k_records()]
    by_split = all_samples(task, questions)
    assert by_split["train"]
    assert by_split["heldout"]
    train, heldout = set(uids(by_split["train"])), set(uids(by_split["heldout"]))
    assert not train & heldout
    assert len(train) + len(heldout) == N_GSM8K
    answers = {s.prompt: s.answer for split in by_split.values() for s in split}
    assert answers == {q: str(2 * i) for i, q in enumerate(questions[:-1])} | {questions[-1]: "1,234"}
    assert task.answer("so it is \\boxed{1,234}") == "1,234"
    n_train = len(train)
    with pytest.raises(ValueError, match=f"{n_train} train records, {n_train + 1} asked for"):
        task.samples("train", n_train + 1, seed=0)


def test_jsonl_split_is_stable(gsm8k_path: Path) -> None:
    questions = [r["question"] for r in gsm8k_records()]
    plain = all_samples(JsonlTask(path=str(gsm8k_path), prompt_key="question", heldout_fraction=0.3), questions)
    again = all_samples(JsonlTask(path=str(gsm8k_path), prompt_key="question", heldout_fraction=0.3), questions)
    assert plain == again
    # A different template must not move a training question into held-out.
    templated = JsonlTask(
        path=str(gsm8k_path), prompt_key="question", prompt_template=GSM8K_TEMPLATE, heldout_fraction=0.3
    )
    rendered = all_samples(templated, questions)
    for split, samples in plain.items():
        expected = sorted(GSM8K_TEMPLATE.replace("{prompt}", s.prompt) for s in samples)
        assert sorted(s.prompt for s in rendered[split]) == expected


def test_jsonl_seeded_sampling(gsm8k_path: Path) -> None:
    task = JsonlTask(path=str(gsm8k_path), prompt_key="question")
    assert task.samples("train", 10, seed=1) == task.samples("train", 10, seed=1)
    assert uids(task.samples("train", 10, seed=1)) != uids(task.samples("train", 10, seed=2))
    assert len(set(uids(task.samples("train", 40, seed=3)))) == 40


def test_jsonl_reward_uses_math_verifier(gsm8k_path: Path) -> None:
    task = JsonlTask(path=str(gsm8k_path), prompt_key="question", heldout_fraction=0.5)
    questions = [r["question"] for r in gsm8k_records()]
    samples = [s for split in all_samples(task, questions).values() for s in split]
    pages = next(s for s in samples if s.prompt == "How many pages in all?")
    assert task.reward(r"2 * 617 pages, so \boxed{1234}", pages) == 1.0
    assert task.reward("So 617 * 2 = 1,234 pages.\n#### 1234", pages) == 1.0
    assert task.reward("The book has 1234 pages.", pages) == 1.0
    assert task.reward(r"\boxed{1233}", pages) == 0.0
    assert task.reward("I don't know", pages) == 0.0


def test_jsonl_plain_records(tmp_path: Path) -> None:
    records = [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "Half of one?", "answer": "1/2"}]
    records += [{"prompt": f"filler {i}", "answer": str(i)} for i in range(30)]
    path = write_jsonl(tmp_path / "plain.jsonl", [json.dumps(r) for r in records])
    task = JsonlTask(path=str(path), prompt_template="Q: {prompt}\nA:", heldout_fraction=0.5)
    by_split = all_samples(task, [r["prompt"] for r in records])
    by_prompt = {s.prompt: s for split in by_split.values() for s in split}
    france, half = by_prompt["Q: Capital of France?\nA:"], by_prompt["Q: Half of one?\nA:"]
    assert france.answer == "Paris"
    assert task.reward("<answer> paris </answer>", france) == 1.0
    assert task.reward("<answer>London</answer>", france) == 0.0
    assert task.reward(r"\boxed{\frac{1}{2}}", half) == 1.0
    assert task.reward(r"\boxed{0.5}", half) == 1.0
    assert task.reward(r"\boxed{0.33}", half) == 0.0


def test_jsonl_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match=r"absent\.jsonl"):
        JsonlTask(path=str(missing))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "x", "answer": ', "not valid JSON"),
        ('["prompt", "answer"]', "expected a JSON object"),
        (
            '{"prompt": "x", "solution": "3"}',
            r"missing field\(s\) \['answer'\]; fields present: \['prompt', 'solution'\]",
        ),
        ('{"prompt": "", "answer": "3"}', "field 'prompt' must be a non-empty string, got ''"),
        ('{"prompt": ["x"], "answer": "3"}', r"field 'prompt' must be a non-empty string, got \['x'\]"),
        ('{"prompt": "x", "answer": null}', "field 'answer' must be a non-empty string or a number, got None"),
        ('{"prompt": "x", "answer": 3, "difficulty": "hard"}', "field 'difficulty' must be a number when present"),
    ],
)
def test_jsonl_bad_line_names_path_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"prompt": "1+1", "answer": "2"})
    path = write_jsonl(tmp_path / "data.jsonl", [good, good.replace("1+1", "2+2"), bad_line, good])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: {message}"):
        JsonlTask(path=str(path))


def test_jsonl_missing_prompt_key(gsm8k_path: Path) -> None:
    # GSM8K has `question`, not the default `prompt`.
    with pytest.raises(ValueError, match=r":1: missing field\(s\) \['prompt'\]"):
        JsonlTask(path=str(gsm8k_path))


def test_jsonl_empty_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no records"):
        JsonlTask(path=str(path))


def test_jsonl_template_needs_prompt(gsm8k_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt_template"):
        JsonlTask(path=str(gsm8k_path), prompt_key="question", prompt_template="Question: {question}")


def test_addition_partial_reward_aligns_digits_from_the_right() -> None:
    task = AdditionTask(max_digits=2, reward_kind="partial")
    sample = Sample(uid="add:57+68", prompt="57+68=", answer="125")
    assert task.reward("125\n", sample) == 1.0
    assert task.reward("25", sample) == pytest.approx(0.5 * 2 / 3)  # units and tens right, hundreds missing
    assert task.reward("135", sample) == pytest.approx(0.5 * 2 / 3)
    assert task.reward("12", sample) == 0.0  # right digits in the wrong places
    assert task.reward("x25", sample) == 0.0  # not a number
    assert AdditionTask(max_digits=2).reward("25", sample) == 0.0
    with pytest.raises(ValueError, match="reward_kind"):
        AdditionTask(reward_kind="digits")
