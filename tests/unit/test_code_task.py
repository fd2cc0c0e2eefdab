"""The code task and its sandbox: real bubblewrap runs of the shipped solutions and of hostile programs.

Each hostile program (a fork bomb, an infinite loop, a 10 GB allocation, a network call, a write
outside its directory, a read of the run's files, an output flood, a program that never prints) is
scored as a response: reward 0, the outcome counted under its reason, the host untouched, and no
process or scratch directory left behind."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from checkpoint_engine.contracts.config import ConfigError
from engine.rewards import RewardConfig, RewardScorer
from engine.tasks import sandbox as sandbox_module
from engine.tasks.base import Sample
from engine.tasks.code import OUTCOMES, CodeTask, extract_program, same_output
from engine.tasks.config import TaskConfig
from engine.tasks.sandbox import FIRST_UID, Sandbox, SandboxConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "engine/tasks/data/code_example.jsonl"
LIMITS = SandboxConfig(seconds=2.0)


def fenced(program: str) -> str:
    return f"Here it is.\n```python\n{program}\n```\n"


def write_records(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def only_sample(task: CodeTask) -> Sample:
    (sample,) = task._records["train"] + task._records["heldout"]
    return sample


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return CodeTask(path=str(EXAMPLES), sandbox=LIMITS)


@pytest.fixture
def echo(tmp_path: Path) -> CodeTask:
    """One stdin/stdout record: print what was read."""
    records = [{"prompt": "Print the line you read.", "tests": [{"input": "ok\n", "output": "ok\n"}]}]
    return CodeTask(path=str(write_records(tmp_path / "echo.jsonl", records)), sandbox=LIMITS)


def _leftovers() -> tuple[list[int], list[str]]:
    procs = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real >= FIRST_UID]
    dirs = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("timeshare-sandbox-")]
    return procs, dirs


def test_every_shipped_solution_passes_its_tests(task: CodeTask) -> None:
    samples = task._records["train"] + task._records["heldout"]
    assert len(samples) == 32
    kinds = {type(json.loads(s.answer)[0]).__name__ for s in samples}
    assert kinds == {"dict", "str"}  # stdin/stdout cases and asserts
    task.take_metrics()
    assert [task.reward(s.demonstration, s) for s in samples] == [1.0] * len(samples)
    metrics = task.take_metrics()
    assert metrics["reward/code/passed"] == len(samples)
    assert metrics["reward/code/programs"] >= len(samples)
    assert metrics["reward/code/program_ms"] > 0
    assert task.take_metrics()["reward/code/passed"] == 0  # counted once, then reset


HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "timeouts"),
    "infinite_loop": ("while True:\n    pass", "timeouts"),
    "allocation_10gb": ("x = bytearray(10 * 2**30)\nprint('ok')", "memory"),
    "output_flood": ("while True:\n    print('x' * 1000)", "output_limit"),
    "never_prints": ("x = input()", "no_output"),
    "wrong_output": ("print('no')", "wrong"),
    "raises": ("raise SystemExit(3)", "errors"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_program_scores_zero_with_its_reason(echo: CodeTask, name: str) -> None:
    program, outcome = HOSTILE[name]
    sample = only_sample(echo)
    echo.take_metrics()
    assert echo.reward(fenced(program), sample) == 0.0
    metrics = echo.take_metrics()
    assert metrics[f"reward/code/{outcome}"] == 1, metrics
    assert sum(metrics[f"reward/code/{o}"] for o in OUTCOMES) == 1  # one outcome per response
    assert _leftovers() == ([], [])
    # The job goes on: the same task still scores a right program.
    assert echo.reward(fenced("print(input())"), sample) == 1.0


def test_a_network_call_reaches_nothing(echo: CodeTask) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the timeout: nothing connected
            accepted.append(server.accept())

    listener = threading.Thread(target=accept)
    listener.start()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('ok')"
    result = Sandbox(LIMITS).run(program)
    listener.join()
    server.close()
    assert result.status == "error"
    assert "ConnectionRefusedError" in result.stderr or "Network is unreachable" in result.stderr
    assert accepted == []  # the host's loopback never saw it
    sample = only_sample(echo)
    echo.take_metrics()
    assert echo.reward(fenced(program), sample) == 0.0
    assert echo.take_metrics()["reward/code/errors"] == 1


def test_host_files_are_neither_readable_nor_writable(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("secret\n")
    sandbox = Sandbox(LIMITS)
    read = sandbox.run(f"print(open({str(run_dir / 'metrics.jsonl')!r}).read())")
    assert read.status == "error"
    assert "FileNotFoundError" in read.stderr
    assert "secret" not in read.stdout
    outside = tmp_path / "written"
    write = sandbox.run(f"open({str(outside)!r}, 'w').write('x')")
    assert write.status == "error"
    assert not outside.exists()
    system = sandbox.run("open('/usr/timeshare-written', 'w').write('x')")
    assert system.status == "error"
    assert "Read-only file system" in system.stderr
    assert not Path("/usr/timeshare-written").exists()
    own = sandbox.run("open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())")
    assert (own.status, own.stdout) == ("ok", "x\n")  # its own directory is writable
    if os.geteuid() == 0:
        assert sandbox.run("import os\nprint(os.getuid())").stdout.strip() != "0"
    assert _leftovers() == ([], [])


def test_partial_reward_is_the_share_of_tests_passed(tmp_path: Path) -> None:
    cases = [{"input": "1\n", "output": "1\n"}, {"input": "2\n", "output": "4\n"}]
    path = write_records(tmp_path / "sq.jsonl", [{"prompt": "Print n*n.", "tests": cases}])
    program = fenced("print(input())")  # right for 1, wrong for 2
    for kind, want in (("partial", 0.5), ("exact", 0.0)):
        task = CodeTask(path=str(path), sandbox=LIMITS, reward_kind=kind)
        sample = only_sample(task)
        assert task.reward(program, sample) == want
        assert task.take_metrics()["reward/code/wrong"] == 1


def test_bad_records_are_set_aside_by_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"prompt": "Print 1.", "tests": [{"input": "", "output": "1\n"}]}
    records = [
        good,
        {"prompt": "No tests."},
        {"prompt": "Tests not a list.", "tests": "assert True"},
        {"prompt": "A bad assert.", "tests": ["assert (1 =="]},
        {"prompt": "A case without output.", "tests": [{"input": "1\n"}]},
        {"tests": ["assert True"]},
    ]
    task = CodeTask(path=str(write_records(tmp_path / "mixed.jsonl", records)), sandbox=LIMITS)
    assert len(task._records["train"]) + len(task._records["heldout"]) == 1
    assert task.take_metrics()["reward/code/bad_records"] == 5
    assert [r["prompt"] for r, _ in task.records()] == ["Print 1."]  # read again: the same records, counted once
    assert task.take_metrics()["reward/code/bad_records"] == 5
    logged = caplog.text
    for line, reason in (
        (2, "'tests' must be a non-empty list"),
        (4, "test 'assert (1 ==' does not compile"),
        (6, "missing field 'prompt'"),
    ):
        assert f"mixed.jsonl:{line}: record set aside: {reason}" in logged
    with pytest.raises(ConfigError, match="holds no records"):
        CodeTask(path=str(write_records(tmp_path / "bad.jsonl", records[1:])), sandbox=LIMITS)


def test_the_program_is_the_last_code_block() -> None:
    assert extract_program("```python\nprint(1)\n```\nthen\n```\nprint(2)\n```") == "print(2)\n"
    assert extract_program("```py\nx = 1\n```") == "x = 1\n"
    assert extract_program("```python\nprint(1)\n") == "print(1)\n"  # cut before its closing fence
    assert extract_program("```python\n\n```") is None
    assert extract_program("print(1)") is None
    assert same_output("1 \n2\n\n", "1\n2")
    assert not same_output("1\n2\n", "1 2\n")


def test_workers_score_in_parallel_with_the_same_rewards(task: CodeTask) -> None:
    samples = (task._records["train"] + task._records["heldout"])[:6]
    pairs = [(s.demonstration if i % 2 else fenced("print('no')"), s) for i, s in enumerate(samples)]
    serial = RewardScorer(RewardConfig(), task).map(task.reward, pairs)
    parallel = RewardScorer(RewardConfig(workers=2), task).map(task.reward, pairs)
    assert serial == parallel == [float(i % 2) for i in range(6)]


def test_the_config_makes_the_task_with_its_limits() -> None:
    made = TaskConfig(name="code", path=str(EXAMPLES), reward="partial", sandbox={"seconds": 1.5}).make()
    assert isinstance(made, CodeTask)
    assert (made.reward_kind, made.sandbox.seconds) == ("partial", 1.5)
    assert TaskConfig(name="code", path=str(EXAMPLES)).answers_span_lines


def test_a_missing_bwrap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="install the Debian package bubblewrap"):
        Sandbox(LIMITS)
