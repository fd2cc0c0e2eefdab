"""The JSONL task: records of the user's (GSM8K-style here), a stable split, seeded sampling, the math
verifier's reward, and a clear error for each kind of bad file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from checkpoint_engine.contracts.config import ConfigError
from engine.tasks import JsonlTask, Sample
from engine.tasks.base import split_of
from engine.tasks.config import TaskConfig
from engine.tasks.jsonl import BOXED, PRESETS


def uids(samples: list[Sample]) -> list[str]:
    return [s.uid for s in samples]


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


EXAMPLES = Path(__file__).resolve().parents[2] / "engine/tasks/data"


@pytest.mark.parametrize(("name", "answer_of_first"), [("gsm8k", "50"), ("math", r"\frac{32}{21}")])
def test_the_dataset_presets_read_the_example_records(name: str, answer_of_first: str) -> None:
    """`task=gsm8k` and `task=math` read their dataset's fields: the reference is the answer the worked
    solution states, the solution is the cold start's demonstration, and the prompt asks for a box."""
    task = TaskConfig(name=name, path=str(EXAMPLES / f"{name}_example.jsonl"), reward="exact").make()
    first = json.loads((EXAMPLES / f"{name}_example.jsonl").read_text().splitlines()[0])
    by_prompt = {s.prompt: s for split in ("train", "heldout") for s in task._records[split]}
    sample = by_prompt[BOXED.replace("{prompt}", first[PRESETS[name].prompt_key])]
    assert sample.answer == answer_of_first
    assert sample.demonstration == first[PRESETS[name].answer_key]
    assert sample.prompt.endswith("put your final answer within \\boxed{}.")
    assert task.reward(f"so it is \\boxed{{{answer_of_first}}}", sample) == 1.0
    assert task.reward("so it is \\boxed{0.123}", sample) == 0.0


def test_a_repeated_prompt_names_both_lines(tmp_path: Path) -> None:
    record = json.dumps({"prompt": "1+1=", "answer": "2"})
    path = write_jsonl(tmp_path / "d.jsonl", [record, json.dumps({"prompt": "2+2=", "answer": "4"}), record])
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: the same prompt as line 1 \(field 'prompt'\)"):
        JsonlTask(path=str(path))


def test_maths_level_is_the_difficulty_unless_one_is_given(tmp_path: Path) -> None:
    records = [
        {"problem": "p1", "solution": "\\boxed{1}", "level": "Level 3"},
        {"problem": "p2", "solution": "\\boxed{2}", "level": "Level ?"},
        {"problem": "p3", "solution": "\\boxed{3}", "level": "Level 5", "difficulty": 0.25},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = TaskConfig(name="math", path=str(path), reward="exact").make()
    by_problem = {r["problem"]: s.difficulty for r, s in task.records()}
    assert by_problem == {"p1": 3.0, "p2": 0.0, "p3": 0.25}
