"""`timeshare filter`'s refusals: each before a model is loaded, one line naming the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "engine/tasks/data"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("filter") / "model", TinyModelSpec(layers=1))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--low", "0.9", "--high", "0.5"], "0 <= --low <= --high <= 1, got 0.9 and 0.5"),
        (["task=addition"], "reads the file tasks (jsonl, gsm8k, math, code, with task.path), not 'addition'"),
    ],
)
def test_bad_arguments_are_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert main(["filter", str(model), str(tmp_path / "out.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_directory_without_a_model_and_an_existing_output_are_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["filter", str(tmp_path), str(tmp_path / "out.jsonl"), "task=jsonl"]) == 2
    assert "is not an HF model directory" in capsys.readouterr().err
    (tmp_path / "out.jsonl").write_text("kept\n")
    assert main(["filter", str(model), str(tmp_path / "out.jsonl")]) == 2
    assert "exists; name a new file" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_text() == "kept\n"
