"""Checkpoints carry checksums: a resume skips a damaged newest checkpoint for the previous sound one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.run_dir import RunManifest, RunPaths
from launch import run_setup, train
from launch.config_loading import load_config
from sidecars.megatron.hf_export import ExportError, export_checkpoint


def write_checkpoint(paths: RunPaths, iteration: int) -> None:
    paths.checkpoint(iteration).mkdir(parents=True)
    paths.controller_state(iteration).write_text(json.dumps({"sampler": iteration}))
    paths.trainer_state(iteration, 0).write_bytes(bytes(range(256)) * 64)
    paths.mark_complete(iteration)


@pytest.fixture
def run(tmp_path: Path) -> RunPaths:
    paths = RunPaths(tmp_path / "run").make()
    for iteration in (1, 2, 3):
        write_checkpoint(paths, iteration)
    return paths


def test_sound_checkpoints_match_their_checksums(run: RunPaths) -> None:
    assert [run.checkpoint_damage(i) for i in (1, 2, 3)] == [None, None, None]
    assert set(json.loads(run.complete_marker(3).read_text())["sha256"]) == {"controller.json", "trainer-rank0.pt"}
    assert run.latest_checkpoint() == 3


def test_truncated_missing_and_unmarked_files_are_damage(run: RunPaths) -> None:
    state = run.trainer_state(3, 0)
    state.write_bytes(state.read_bytes()[:1000])
    assert run.checkpoint_damage(3) == "trainer-rank0.pt does not match its checksum"
    run.controller_state(2).unlink()
    assert run.checkpoint_damage(2) == "controller.json is missing"
    run.complete_marker(1).write_text(json.dumps({"iteration": 1}))
    assert run.checkpoint_damage(1) == "its COMPLETE marker has no readable checksums"


def test_latest_checkpoint_falls_back_and_warns_naming_both(run: RunPaths, caplog: pytest.LogCaptureFixture) -> None:
    state = run.trainer_state(3, 0)
    state.write_bytes(state.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING):
        assert run.latest_checkpoint() == 2
    (warning,) = caplog.messages
    assert str(run.checkpoint(3)) in warning
    assert str(run.checkpoint(2)) in warning
    assert "trainer-rank0.pt does not match its checksum" in warning


def test_resume_starts_from_the_previous_sound_checkpoint(run: RunPaths) -> None:
    run.config.write_text(json.dumps(load_config([]).to_dict()))
    run.trainer_state(3, 0).write_bytes(b"")
    _, paths, start = run_setup.prepare_run(load_config([f"resume={run.root}"]), [f"resume={run.root}"])
    assert (paths.root, start) == (run.root, 2)
    for iteration in (1, 2):
        run.controller_state(iteration).write_text("{}")
    with pytest.raises(ConfigError, match="no sound checkpoint"):
        run_setup.prepare_run(load_config([f"resume={run.root}"]), [f"resume={run.root}"])


def test_a_failed_job_restarts_from_its_newest_sound_checkpoint_or_from_the_start_before_the_first(
    tmp_path: Path,
) -> None:
    cfg = load_config(["run.restarts=1"])
    fresh = RunPaths(tmp_path / "fresh").make()
    assert train._restart_point(cfg, fresh, restarts=0) == 0
    assert train._restart_point(cfg, fresh, restarts=1) is None  # none left
    write_checkpoint(fresh, 1)
    write_checkpoint(fresh, 2)
    fresh.trainer_state(2, 0).write_bytes(b"")
    assert train._restart_point(cfg, fresh, restarts=0) == 1
    fresh.trainer_state(1, 0).write_bytes(b"")
    assert train._restart_point(cfg, fresh, restarts=0) is None  # starting over would write over them


def test_a_checkpoint_written_again_over_a_crashed_marker_is_sound(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run").make()
    paths.checkpoint(1).mkdir(parents=True)
    paths.complete_marker(1).with_name("COMPLETE.partial").write_text("{")  # a crash before the rename
    paths.controller_state(1).write_text(json.dumps({"sampler": 1}))
    paths.trainer_state(1, 0).write_bytes(b"state")
    paths.mark_complete(1)
    assert paths.checkpoint_damage(1) is None


def test_export_reads_the_model_and_its_shards_from_the_runs_manifest(run: RunPaths) -> None:
    run.config.write_text("{}")
    with pytest.raises(ExportError, match=r"has no manifest\.json, which every run writes as it starts"):
        export_checkpoint(run.root, run.root / "hf")
    torch.save({"model": {}}, run.trainer_state(3, 0))
    run.mark_complete(3)
    RunManifest(model_dir=str(run.root / "elsewhere"), trainer_tp=2).to_json_file(run.manifest)
    with pytest.raises(FileNotFoundError, match=r"trainer-rank1\.pt"):  # the manifest's two shards are read
        export_checkpoint(run.root, run.root / "hf")


def test_another_nodes_engine_token_is_read_from_its_document(run: RunPaths) -> None:
    run.engine_config("node1").write_text(json.dumps({"token": "t0k", "port": 9}))
    run.engine_config("node2").write_text(json.dumps({"port": 9}))
    assert (run.engine_token("node1"), run.engine_token("node2")) == ("t0k", None)
    with pytest.raises(FileNotFoundError, match=r"engine-node3\.json"):
        run.engine_token("node3")
