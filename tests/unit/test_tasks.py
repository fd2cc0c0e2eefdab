"""The verifiable tasks: seeded samples, disjoint splits, rewards and option errors."""

from __future__ import annotations

import pytest

from engine.tasks import TASKS, AdditionTask, Sample, ScratchpadTask, SortTask, make_task
from engine.tasks.base import partial_credit
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
