"""`code`: programming problems from a JSONL file, rewarded by running the response's program on tests.

Each line is a JSON object: `prompt` (the problem), `tests` (a non-empty list, either all
`{"input": ..., "output": ...}` cases, fed on stdin and compared with stdout line by line with
trailing spaces ignored, or all Python `assert` statements, each run after the program), optional
`solution` (the cold start's demonstration) and `difficulty`. A record whose tests are missing or
cannot be read (not a list, a case without its fields, an assert that does not compile) is set aside
with a warning naming its line; the job goes on with the others (`reward/code/bad_records`).

The program is the response's last fenced code block (```python ... ```, an open one to the end of
the response); each test case runs it in the sandbox (`engine.tasks.sandbox`). Reward: exact, 1 when
every case passes (the first failure ends the record's runs); partial, the share of cases that pass.
Every scored response ends in one outcome, counted per iteration as `reward/code/<outcome>`: passed,
wrong (ran, wrong output or a failed assert), no_output (ran and printed nothing where output was
expected), errors (raised or exited non-zero: a refused network call or file access lands here),
timeouts, memory, output_limit, no_program (no code block).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from engine.tasks.base import RewardKind, Sample, check_reward_kind
from engine.tasks.jsonl import JsonlTask
from engine.tasks.sandbox import RunResult, Sandbox, SandboxConfig

log = logging.getLogger(__name__)

CODE = "{prompt}\nWrite a Python 3 program that solves it and give the whole program in one ```python code block."
OUTCOMES = ("passed", "wrong", "no_output", "errors", "timeouts", "memory", "output_limit", "no_program")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", flags=re.DOTALL)
_FAILED_RUN = {"error": "errors", "timeout": "timeouts", "memory": "memory", "output_limit": "output_limit"}


def extract_program(response: str) -> str | None:
    """The last fenced code block of `response` (one left open runs to the end: a program the length
    limit cut runs as it is), None when there is none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks and blocks[-1].strip() else None


def read_tests(raw: object) -> list[dict[str, str]] | list[str]:
    """A record's `tests` checked: stdin/stdout cases or assert statements; ValueError saying what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'tests' must be a non-empty list, got {raw!r}"[:200])
    if all(isinstance(t, str) for t in raw):
        for t in raw:
            try:
                compile(t, "<test>", "exec")
            except SyntaxError as e:
                raise ValueError(f"test {t!r} does not compile ({e.msg})") from None
        return raw
    for t in raw:
        if not (isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
            raise ValueError(f"each test must be an assert string or {{'input': str, 'output': str}}, got {t!r}"[:200])
    return raw


def same_output(got: str, want: str) -> bool:
    """Equal line by line, trailing spaces and trailing blank lines ignored (as judges compare)."""
    return [line.rstrip() for line in got.rstrip().splitlines()] == [
        line.rstrip() for line in want.rstrip().splitlines()
    ]


@dataclass
class CodeTask(JsonlTask):
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reward_kind: RewardKind = "exact"
    name: str = "code"
    answer_key: str = "tests"
    prompt_template: str = CODE
    _runner: Sandbox = field(init=False, repr=False)
    _counts: Counter = field(default_factory=Counter, init=False, repr=False)
    _program_seconds: list[float] = field(default_factory=list, init=False, repr=False)
    _set_aside: set[str] = field(default_factory=set, init=False, repr=False)  # their lines, once each
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        check_reward_kind("code", self.reward_kind)
        self._runner = Sandbox(self.sandbox)
        super().__post_init__()

    def _sample(self, record: dict, where: str) -> tuple[str, Sample] | None:
        try:
            tests = read_tests(record.get("tests"))
            if self.prompt_key not in record:
                raise ValueError(f"missing field {self.prompt_key!r}; fields present: {sorted(record)}")
            raw_prompt, _, difficulty = self._fields({**record, self.answer_key: "tests"}, where)
            solution = record.get("solution", "")
            if not isinstance(solution, str):
                raise ValueError(f"'solution' must be a string when present, got {solution!r}"[:200])
        except ValueError as e:  # ConfigError is one
            if where not in self._set_aside:
                log.warning("%s: record set aside: %s", where, e)
                self._set_aside.add(where)
            return None
        demonstration = f"```python\n{solution.strip()}\n```" if solution.strip() else ""
        return self._make_sample(raw_prompt, json.dumps(tests), difficulty, demonstration)

    def answer(self, response: str) -> str | None:
        program = extract_program(response)
        return None if program is None else program.strip()

    def reward(self, response: str, sample: Sample) -> float:
        program = extract_program(response)
        if program is None:
            self._count("no_program")
            return 0.0
        tests = json.loads(sample.answer)
        passed, outcome = 0, "passed"
        for test in tests:
            verdict = self._check(program, test)
            if verdict == "passed":
                passed += 1
                continue
            outcome = outcome if outcome != "passed" else verdict
            if self.reward_kind == "exact":
                break
        self._count(outcome)
        if self.reward_kind == "exact":
            return 1.0 if passed == len(tests) else 0.0
        return passed / len(tests)

    def _check(self, program: str, test: dict[str, str] | str) -> str:
        """One case's outcome (see the module's docstring)."""
        if isinstance(test, str):
            result = self._run(f"{program}\n\n{test}\n", "")
            if result.status == "error" and "AssertionError" in result.stderr:
                return "wrong"
            return "passed" if result.status == "ok" else _FAILED_RUN[result.status]
        result = self._run(program, test["input"])
        if result.status != "ok":
            return _FAILED_RUN[result.status]
        if same_output(result.stdout, test["output"]):
            return "passed"
        return "no_output" if not result.stdout.strip() else "wrong"

    def _run(self, program: str, stdin: str) -> RunResult:
        start = time.perf_counter()
        result = self._runner.run(program, stdin)
        with self._lock:
            self._program_seconds.append(time.perf_counter() - start)
        return result

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def take_metrics(self) -> dict[str, float]:
        """The outcomes since the last call (`reward/code/...`), and the programs' mean milliseconds."""
        with self._lock:
            counts, seconds = self._counts, self._program_seconds
            self._counts, self._program_seconds = Counter(), []
        out = {f"reward/code/{o}": float(counts[o]) for o in OUTCOMES}
        out["reward/code/bad_records"] = float(len(self._set_aside))
        out["reward/code/programs"] = float(len(seconds))
        if seconds:
            out["reward/code/program_ms"] = 1000 * sum(seconds) / len(seconds)
        return out
