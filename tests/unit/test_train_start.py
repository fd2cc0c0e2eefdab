"""A run starts in a directory of its own, or fails before it makes one, with one line naming the bad value."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.process_group import last_error
from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch import cli, job, run_setup, train
from launch.config_loading import load_config
from launch.train_config import ParallelConfig


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261129-120000")
    made = [run_setup.new_run_dir(tmp_path, "scratchpad-kimi") for _ in range(3)]
    assert [p.name for p in made] == [f"scratchpad-kimi-20261129-120000{s}" for s in ("", "-2", "-3")]
    assert all(p.is_dir() for p in made)


def _empty_dir(root: Path) -> Path:
    root.mkdir()
    return root


def _without_tokenizer(root: Path) -> Path:
    model = write_tiny_model(root, TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1))
    for f in model.iterdir():
        if "token" in f.name or f.suffix in (".model", ".txt"):
            f.unlink()
    return model


def _with_arch(root: Path, arch: str) -> Path:
    model = write_tiny_model(root, TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    return model


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nonexistent", r"model\.path=.*nonexistent: no such directory"),
        (_empty_dir, r"model\.path=.* is not a model timeshare can train: .* has no config\.json"),
        (_without_tokenizer, r"model\.path=.*: its tokenizer does not load"),
        (lambda d: _with_arch(d, "GPT2LMHeadModel"), r"model\.path=.*unsupported architecture \['GPT2LMHeadModel'\]"),
    ],
    ids=["missing", "not-a-model", "no-tokenizer", "unsupported"],
)
def test_a_bad_model_dir_fails_before_the_run_directory_exists(tmp_path: Path, make, message, capsys) -> None:
    model = make(tmp_path / "given")
    capsys.readouterr()  # what making the model printed
    runs = tmp_path / "runs"
    assert cli.main(["train", f"model.path={model}", f"run.root={runs}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=message):
        run_setup.check_model_dir(model, ParallelConfig())
    assert not runs.exists() or not list(runs.iterdir())


def test_a_bad_dataset_record_fails_before_anything_starts_naming_its_line(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": ""}\n')
    runs = tmp_path / "runs"
    assert cli.main(["train", "task=jsonl", f"task.path={data}", f"run.root={runs}"]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert f"{data}:2: field 'answer' must be a non-empty string or a number, got ''" in line
    assert not runs.exists() or not list(runs.iterdir())


def test_a_sound_model_dir_passes(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1))
    run_setup.check_model_dir(model, ParallelConfig())


def test_a_parallel_layout_the_model_does_not_divide_fails_before_anything_starts(tmp_path: Path, capsys) -> None:
    moe = write_tiny_model(tmp_path / "moe", TinyModelSpec(arch="qwen3_moe", layers=1, hidden=64, heads=2, kv_heads=1))
    dense = write_tiny_model(tmp_path / "dense", TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1))
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible by expert_parallel=3"):
        run_setup.check_model_dir(moe, ParallelConfig(trainer_dp=3, trainer_ep=3))
    with pytest.raises(ConfigError, match="MoE models train at tensor_parallel=1"):
        run_setup.check_model_dir(moe, ParallelConfig(trainer_tp=2))
    with pytest.raises(ConfigError, match="llama is dense"):
        run_setup.check_model_dir(dense, ParallelConfig(trainer_dp=2, trainer_ep=2))
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert (
        cli.main(["train", f"model.path={dense}", "parallel.trainer_dp=2", "parallel.trainer_ep=2", f"run.root={runs}"])
        == 2
    )
    assert "needs a mixture-of-experts model" in capsys.readouterr().err
    assert not runs.exists() or not list(runs.iterdir())


def test_last_error_is_the_last_traceback_line(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text(
        'INFO starting\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "checkpoint_engine.contracts.config.ConfigError: cluster has 2 nodes; set transfer=mooncake\n"
        "INFO shutting down\n"
    )
    assert (
        last_error(log) == "checkpoint_engine.contracts.config.ConfigError: cluster has 2 nodes; set transfer=mooncake"
    )
    log.write_text(  # torchrun's summary after its rank's traceback: the rank's error is the cause
        "[rank0]: TakeUpError: the trainer needs the checkpoint of iteration 0\nE1207 failed (exitcode: 1)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\n"
    )
    assert last_error(log) == "TakeUpError: the trainer needs the checkpoint of iteration 0"
    log.write_text("just a line\nthe end\n")
    assert last_error(log) == "the end"
    log.write_text("")
    assert last_error(log).endswith("is empty")
    assert last_error(tmp_path / "absent.log").startswith("no log")


def test_a_failed_controller_request_names_the_process_that_died() -> None:
    def dead_engine() -> None:
        raise train.JobFailedError("the checkpoint engine exited with status -9 (no error in its log)")

    failure = pytest.raises(train.JobFailedError, match="checkpoint engine exited with status -9")
    with failure, train._failures_named(dead_engine, wait=1.0):
        raise requests.ReadTimeout("read timed out")


def test_a_failed_controller_request_with_every_process_alive_is_one_line_naming_the_request() -> None:
    failure = pytest.raises(train.JobFailedError, match=r"failed \(ReadTimeout: read timed out\)")
    with failure, train._failures_named(lambda: None, wait=0.2):
        raise requests.ReadTimeout("read timed out")


def test_nodes_on_one_machine_share_its_cores_unless_the_user_chose(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for environ, expected in (({}, "4"), ({"OMP_NUM_THREADS": "3"}, "3")):
        monkeypatch.setattr(os, "environ", environ)
        job._share_cores(2)
        assert environ["OMP_NUM_THREADS"] == expected
    monkeypatch.setattr(os, "environ", {})
    job._share_cores(16)
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_a_train_only_run_needs_a_run_of_its_model_with_a_batch_per_version(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "rollouts").mkdir(parents=True)
    for version in (0, 1):
        (source / "rollouts" / f"iter_{version:05d}.pt").write_bytes(b"")
    (source / "config.json").write_text(json.dumps(load_config([]).to_dict()))
    train_only = ["run.mode=train_only", f"run.batches_from={source}"]
    run_setup.check_batches_from(load_config([*train_only, "run.iterations=2"]), 0)
    with pytest.raises(
        ConfigError, match=r"no batch of versions \[2\] \(it holds \[0, 1\]\); lower run.iterations to 2"
    ):
        run_setup.check_batches_from(load_config([*train_only, "run.iterations=3"]), 0)
    run_setup.check_batches_from(load_config([*train_only, "run.iterations=2"]), 2)  # resumed past them all
    with pytest.raises(ConfigError, match=r"run.batches_from=.*: its model .* is not this run's"):
        run_setup.check_batches_from(load_config([*train_only, "run.iterations=2", "model.layers=2"]), 0)
    with pytest.raises(ConfigError, match=r"run.batches_from=.*: not a run directory \(no config.json\)"):
        run_setup.check_batches_from(load_config(["run.mode=train_only", f"run.batches_from={tmp_path}"]), 0)
