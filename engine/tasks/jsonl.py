"""`jsonl`, `gsm8k`, `math`: prompt/answer records from a file, scored by the math verifier.

Each line is a JSON object with a prompt field and an answer field; `PRESETS` names them per
dataset format: `jsonl` reads `prompt` / `answer`, `gsm8k` GSM8K's `question` / `answer` (worked
solution ending `#### 42`), `math` MATH's `problem` / `solution` (the answer in its last `\\boxed{}`);
the two datasets' prompts ask for the final answer in `\\boxed{}`, as Qwen's math models are asked.
`prompt_template` has `{prompt}` replaced literally, so other braces (`\\boxed{}`) may appear in it.
Records go to train or held-out by a hash of their prompt field (not the templated prompt), so
the split is stable and a change of template cannot move training records into held-out.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint_engine.contracts.config import ConfigError
from engine.tasks.base import Sample, Split, check_count, check_split, split_of
from engine.tasks.math_verify import extract_answer, math_reward, reference_answer

_LEVEL = re.compile(r"Level (\d+)")
BOXED = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."


def json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a JSONL file, or a ConfigError naming the line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


@dataclass(frozen=True)
class Preset:
    """Where a dataset format keeps the prompt and the reference, and how its prompts read."""

    prompt_key: str
    answer_key: str
    prompt_template: str
    answers_span_lines: bool = False  # worked steps before the final answer: rollout.stop must not be a newline


PRESETS = {
    "jsonl": Preset("prompt", "answer", "{prompt}"),
    "gsm8k": Preset("question", "answer", BOXED, answers_span_lines=True),
    "math": Preset("problem", "solution", BOXED, answers_span_lines=True),
}


@dataclass
class JsonlTask:
    path: str
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = "{prompt}"
    heldout_fraction: float = 0.1
    name: str = "jsonl"
    _records: dict[Split, list[Sample]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"jsonl.prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        self._records = {"train": [], "heldout": []}
        for _, key, sample in self._load():
            self._records[split_of(key, self.heldout_fraction)].append(sample)

    def records(self) -> list[tuple[dict, Sample]]:
        """Every record of the file read again, in file order, with its sample (both splits; records set
        aside are left out): what `timeshare filter` writes back with their pass rates."""
        return [(record, sample) for record, _, sample in self._load()]

    def _load(self) -> list[tuple[dict, str, Sample]]:
        """(record, raw prompt field, sample) for each record."""
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"jsonl.path {self.path!r} is not a file")
        samples: list[tuple[dict, str, Sample]] = []
        first_line: dict[str, int] = {}  # uid -> the line that gave it
        for lineno, record in json_objects(path):
            made = self._sample(record, f"{path}:{lineno}")
            if made is None:
                continue
            raw_prompt, sample = made
            uid = sample.uid
            if uid in first_line:
                raise ConfigError(
                    f"{path}:{lineno}: the same prompt as line {first_line[uid]} (field {self.prompt_key!r}); "
                    "each record's prompt must be distinct"
                )
            first_line[uid] = lineno
            samples.append((record, raw_prompt, sample))
        if not samples:
            raise ConfigError(f"{path} holds no records")
        return samples

    def _sample(self, record: dict, where: str) -> tuple[str, Sample] | None:
        """(raw prompt field, sample) of one record (`where` names its line in errors); None sets it aside."""
        missing = [k for k in (self.prompt_key, self.answer_key) if k not in record]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}; fields present: {sorted(record)}")
        raw_prompt, raw_answer, difficulty = self._fields(record, where)
        answer = reference_answer(raw_answer)
        # A worked solution (GSM8K's, MATH's) is what the cold start demonstrates.
        worked = raw_answer.strip() if raw_answer.strip() != answer else ""
        return self._make_sample(raw_prompt, answer, difficulty, worked)

    def _make_sample(self, raw_prompt: str, answer: str, difficulty: float, demonstration: str) -> tuple[str, Sample]:
        prompt = self.prompt_template.replace("{prompt}", raw_prompt)
        uid = "jsonl:" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
        return raw_prompt, Sample(uid, prompt, answer, difficulty=difficulty, demonstration=demonstration)

    def _fields(self, record: dict, where: str) -> tuple[str, str, float]:
        """The record's prompt (a non-empty string), answer (a non-empty string or a number) and difficulty
        (a number; else MATH's `level`; 0 when neither is there), or a ConfigError naming the line, the
        field and the value."""
        prompt, answer, difficulty = record[self.prompt_key], record[self.answer_key], record.get("difficulty")
        if difficulty is None:  # MATH's "Level 1" .. "Level 5" (its "Level ?" records stay at 0)
            level = _LEVEL.fullmatch(str(record.get("level", "")))
            difficulty = int(level[1]) if level else 0.0
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: field {self.prompt_key!r} must be a non-empty string, got {prompt!r}")
        numeric = isinstance(answer, int | float) and not isinstance(answer, bool)
        if not numeric and (not isinstance(answer, str) or not answer.strip()):
            wanted = "a non-empty string or a number"
            raise ConfigError(f"{where}: field {self.answer_key!r} must be {wanted}, got {answer!r}")
        if not isinstance(difficulty, int | float) or isinstance(difficulty, bool):
            raise ConfigError(f"{where}: field 'difficulty' must be a number when present, got {difficulty!r}")
        return prompt, str(answer), float(difficulty)

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        pool = self._records[check_split(split)]
        if check_count(n) > len(pool):
            raise ConfigError(f"{self.path} has {len(pool)} {split} records, {n} asked for")
        return random.Random(f"{self.name}:{split}:{seed}").sample(pool, n)

    def answer(self, response: str) -> str | None:
        return extract_answer(response)

    def reward(self, response: str, sample: Sample) -> float:
        return math_reward(response, sample.answer)
