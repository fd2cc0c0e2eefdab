"""How an engine and a vLLM zygote that is not its own find each other: the request files, and a clear error
when no zygote serves the directory the run names."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_engine import vllm_process
from checkpoint_engine.contracts.vllm_protocol import ForkRequest, VllmSettings, ZygoteFiles
from checkpoint_engine.vllm_process import VllmProcess, VllmStartError

SETTINGS = VllmSettings(
    model_dir="/m", port=8001, tensor_parallel=1, gpu_memory_utilization=0.1, max_model_len=64, dtype="float32", seed=0
)


def test_a_request_is_taken_once_and_whole(tmp_path: Path) -> None:
    files = ZygoteFiles(tmp_path / "vllm")
    files.sidecar_pid.write_text("123")  # the last request's sidecar
    request = ForkRequest(engine_pid=42, settings=str(files.settings), log=str(tmp_path / "vllm.log"))
    files.ask(request)
    assert not files.sidecar_pid.exists()  # the engine adopts only the pid written for this request
    assert [p.name for p in tmp_path.iterdir()] == ["vllm.fork"]  # no temporary file left beside it
    assert files.take() == request
    assert files.take() is None


def test_a_malformed_request_is_refused_and_removed(tmp_path: Path) -> None:
    files = ZygoteFiles(tmp_path / "vllm")
    files.request.write_text('{"engine_pid": 0}')
    with pytest.raises(ValueError, match="engine_pid"):
        files.take()
    assert not files.request.exists()


def test_pids_that_are_not_written_read_as_none(tmp_path: Path) -> None:
    files = ZygoteFiles(tmp_path / "vllm")
    assert files.read_pid(files.zygote_pid) is None
    files.zygote_pid.write_text("")
    assert files.read_pid(files.zygote_pid) is None
    files.zygote_pid.write_text("77")
    assert files.read_pid(files.zygote_pid) == 77


def test_an_engine_writes_its_settings_where_a_zygote_of_its_own_reads_them(tmp_path: Path) -> None:
    vllm = VllmProcess(SETTINGS, tmp_path / "logs" / "vllm-node0.log", zygote_dir=tmp_path / "shared")
    assert VllmSettings.from_json_file(tmp_path / "shared" / "vllm.json") == SETTINGS
    vllm.prepare()
    assert not vllm.zygote_alive()  # nothing spawned: the zygote is not the engine's


def test_no_zygote_in_the_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_process, "EXTERNAL_ZYGOTE_WAIT", 0.2)
    vllm = VllmProcess(SETTINGS, tmp_path / "vllm-node0.log", zygote_dir=tmp_path / "shared")
    (tmp_path / "shared" / "vllm.zygote").write_text("999999999")  # a zygote that has exited
    with pytest.raises(VllmStartError, match=r"no vLLM zygote serves .*shared.*timeshare vllm-zygote"):
        vllm.start(timeout=10)
    vllm.close()
    assert not (tmp_path / "shared" / "vllm.fork").exists()


FORK_AFTER_COMPILE = """
import json, os, sys, time
import torch
from checkpoint_engine.contracts.vllm_protocol import VllmSettings
from sidecars.vllm.llm import compile_sampler_ops

model = sys.argv[1]
compile_sampler_ops(VllmSettings(model_dir=model, port=1, tensor_parallel=1, gpu_memory_utilization=0.1,
                                 max_model_len=64, dtype="float32", seed=0))
pid = os.fork()
if pid == 0:  # a sidecar: vLLM's first buffers are filled by parallel torch ops
    torch.zeros(1 << 21).add_(1)
    os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if os.waitpid(pid, os.WNOHANG)[0]:
        print("child finished")
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
print("child hung")
sys.exit(1)
"""


def test_a_sidecar_forked_after_the_zygotes_compile_runs_parallel_torch_ops(tmp_path: Path) -> None:
    """At a real vocabulary's size the sampler kernel would open OpenMP's thread pool in the zygote,
    and every forked sidecar would then hang in its first parallel op (vLLM never became healthy)."""
    import os
    import subprocess
    import sys

    (tmp_path / "config.json").write_text('{"vocab_size": 151936}')
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_COMPILE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "child finished" in proc.stdout
