"""The vLLM sidecar process: dummy start, verified pushes, generation API, kill and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import torch

from checkpoint_engine.contracts.vllm_client import SidecarError
from checkpoint_engine.contracts.vllm_protocol import GenerationRequest, VllmSettings
from checkpoint_engine.contracts.weight_region import remove_region, write_region
from checkpoint_engine.process_group import ProcessGroup
from checkpoint_engine.vllm_process import VllmProcess
from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.etcd_server import free_loopback_ports
from sidecars.megatron.model import read_hf_tensors
from tests.faults.injection import kill_next_sidecar
from tests.integration.train_job import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("m") / "model", TinyModelSpec(layers=2, hidden=128, heads=4))


@pytest.fixture
def regions():
    names: list[str] = []

    def make(version: int, tensors: dict[str, torch.Tensor]) -> dict:
        name = f"timeshare-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return write_region(name, version, tensors).to_dict()

    yield make
    for n in names:
        remove_region(n)


def _hf_logprobs(model_dir: Path, prompt: list[int], tokens: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist()


def test_sidecar_lifecycle(model_dir: Path, tmp_path: Path, regions) -> None:
    weights = read_hf_tensors(model_dir)
    v1 = regions(1, weights)
    shm_before = set(os.listdir("/dev/shm"))
    settings = VllmSettings(
        model_dir=str(model_dir),
        port=free_loopback_ports(1)[0],
        tensor_parallel=1,
        gpu_memory_utilization=0.15,
        max_model_len=512,
        dtype="float32",
        seed=0,
    )
    vllm = VllmProcess(settings, tmp_path / "vllm.log")
    try:
        vllm.prepare()  # the zygote: imports, then waits for a fork request without serving anything
        assert vllm.zygote_alive()
        assert not vllm.alive()
        with pytest.raises(requests.ConnectionError):
            vllm.client.health()
        startup = vllm.start()
        times = vllm.startup
        assert times is not None
        assert times.imports > 0
        assert times.fork > 0
        assert times.build > 0
        assert vllm.pid != vllm.zygote_pid
        print(f"vLLM fork request to healthy: {startup:.1f} s ({times})")
        assert vllm.client.health().weight_version == -1
        prompt = [1, 20, 21, 22]
        with pytest.raises(SidecarError, match="no weights loaded"):
            vllm.client.generate([GenerationRequest(prompt_ids=prompt, max_tokens=4)])

        assert vllm.client.update_weights(v1).weight_version == 1
        greedy = GenerationRequest(prompt_ids=prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
        full = vllm.client.generate([greedy]).results[0].samples[0]
        assert (len(full.token_ids), full.finish_reason, full.weight_version) == (10, "length", 1)

        # Repeat detection during generation: greedy decoding of the test model falls into a loop, which
        # vLLM ends as "repeat" once the output's tail is an n-gram repeated back to back; without
        # detection the same request runs to its cap.
        looping = GenerationRequest(prompt_ids=prompt, max_tokens=400, temperature=0.0, ignore_eos=True)
        free = vllm.client.generate([looping]).results[0].samples[0]
        detect = looping.model_copy(update={"repeat_max_ngram": 8, "repeat_min_repeats": 3})
        stopped = vllm.client.generate([detect]).results[0].samples[0]
        assert (len(free.token_ids), free.finish_reason) == (400, "length")
        assert stopped.finish_reason == "repeat"
        assert len(stopped.token_ids) < 400
        assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]  # the same sequence, cut short
        tail = stopped.token_ids
        assert any(tail[-3 * n :] == tail[-n:] * 3 for n in range(1, 9)), tail[-24:]

        # Continuation from prompt + partial output gives the rest of the same greedy sequence.
        cont = GenerationRequest(prompt_ids=prompt + full.token_ids[:4], max_tokens=6, temperature=0.0, ignore_eos=True)
        assert vllm.client.generate([cont]).results[0].samples[0].token_ids == full.token_ids[4:]

        # n samples at temperature 1: per-token logprobs of the sampling distribution, equal to HF's.
        sampled = vllm.client.generate([GenerationRequest(prompt_ids=prompt, max_tokens=8, n=3, seed=1)]).results[0]
        assert len(sampled.samples) == 3
        s = sampled.samples[0]
        assert len(s.logprobs) == len(s.token_ids)
        gap = max(abs(a - b) for a, b in zip(s.logprobs, _hf_logprobs(model_dir, prompt, s.token_ids), strict=True))
        assert gap < 1e-4

        # A corrupted shard is refused by name and the live version stays; so is a stale version.
        bad = dict(weights)
        bad["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"].clone()
        v2 = regions(2, bad)
        up = next(sl for sl in v2["slots"] if sl["name"] == "model.layers.1.mlp.up_proj.weight")
        with open(f"/dev/shm/{v2['region']}", "r+b") as f:
            f.seek(up["offset"] + 3)
            f.write(b"\x7f")
        with pytest.raises(SidecarError, match=r"409.*model\.layers\.1\.mlp\.up_proj\.weight"):
            vllm.client.update_weights(v2)
        with pytest.raises(SidecarError, match="stale"):
            vllm.client.update_weights(v1)
        assert vllm.client.health().weight_version == 1
        assert vllm.client.generate([greedy]).results[0].samples[0].token_ids == full.token_ids

        # Killed mid-generation: the failure surfaces, the tree is cleaned up, a restart works.
        long = GenerationRequest(prompt_ids=prompt, max_tokens=480, n=256, ignore_eos=True)
        errors: list[Exception] = []
        worker = threading.Thread(target=lambda: _capture(errors, vllm.client.generate, [long]))
        worker.start()
        time.sleep(2.0)  # the request is being generated (256 x 480 tokens take far longer)
        assert worker.is_alive()
        os.kill(vllm.pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert errors, "generation survived the sidecar being killed"
        deadline = time.monotonic() + 10  # the error reaches the client as the process dies, not after
        while vllm.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not vllm.alive()
        pids = vllm.terminate().pids
        assert not [p for p in pids if psutil.pid_exists(p)], "part of the killed vLLM tree is still running"

        vllm.start()
        assert vllm.startup.imports == 0.0  # forked again from the same zygote: nothing imported twice
        assert vllm.client.update_weights(v1).weight_version == 1
        assert vllm.client.generate([greedy]).results[0].samples[0].token_ids == full.token_ids

        # Killed during its start-up: started again (the engine's phase.vllm_start_attempts).
        vllm.terminate()
        killer = threading.Thread(target=kill_next_sidecar, args=(psutil.Process(vllm.zygote_pid),))
        killer.start()
        _, retries = vllm.start_retrying(timeout=120, attempts=2, pause=0.1)
        killer.join()
        assert retries == 1
        assert vllm.client.update_weights(v1).weight_version == 1
    finally:
        report = vllm.terminate()
        zygote = vllm.zygote_pid
        vllm.close()
    assert report.pids
    assert not any(psutil.pid_exists(p) for p in report.pids)
    assert zygote is not None
    assert not psutil.pid_exists(zygote)
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before if not n.startswith("timeshare-test-")}
    assert not left, f"vLLM left shared-memory segments behind: {left}"  # ours go with the fixture


def _capture(errors: list[Exception], fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        errors.append(e)


def test_a_zygote_of_its_own_serves_engine_after_engine(model_dir: Path, tmp_path: Path, regions) -> None:
    """`timeshare vllm-zygote DIR` (a vLLM container's command) forks sidecars for one engine, then for the next
    one with new ports, imports done once; a sidecar dies with the engine that asked for it even though the
    zygote lives on, and the zygote stops on SIGTERM, taking a live sidecar with it."""
    zygote_dir, shm_before = tmp_path / "zygote", set(os.listdir("/dev/shm"))
    zygote = ProcessGroup.spawn(
        [sys.executable, "-m", "launch.cli", "vllm-zygote", str(zygote_dir)], tmp_path / "zygote.log"
    )
    v1 = regions(1, read_hf_tensors(model_dir))

    def engine(name: str) -> VllmProcess:
        settings = VllmSettings(
            model_dir=str(model_dir),
            port=free_loopback_ports(1)[0],
            tensor_parallel=1,
            gpu_memory_utilization=0.15,
            max_model_len=512,
            dtype="float32",
            seed=0,
        )
        return VllmProcess(settings, tmp_path / f"vllm-{name}.log", zygote_dir=zygote_dir)

    try:
        first = engine("first")
        first.prepare()  # not the engine's to spawn
        assert first.start(timeout=180) > 0
        assert psutil.Process(first.pid).ppid() == zygote.pid == first.zygote_pid
        assert first.startup.imports > 0
        assert first.client.update_weights(v1).weight_version == 1
        assert "vLLM built:" in (tmp_path / "vllm-first.log").read_text()  # the sidecar writes to its engine's log
        first.close()
        assert zygote.alive()

        second = engine("second")  # a restarted engine: new ports, the same zygote
        assert second.settings.port != first.settings.port
        second.start(timeout=180)
        assert second.startup.imports == 0.0
        assert second.client.health().weight_version == -1
        second.close()

        # An engine killed outright (SIGKILL) cannot kill its sidecar: the sidecar sees it gone and exits.
        code = (
            "import sys, time; from pathlib import Path; from checkpoint_engine.vllm_process import VllmProcess; "
            "from checkpoint_engine.contracts.vllm_protocol import VllmSettings as S; "
            f"v = VllmProcess(S.from_json_file({str(second.files.settings)!r}), Path({str(tmp_path / 'v3.log')!r}), "
            f"zygote_dir=Path({str(zygote_dir)!r})); v.start(timeout=180); print(v.pid, flush=True); time.sleep(600)"
        )
        doomed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO)
        sidecar = int(doomed.stdout.readline())
        doomed.kill()
        doomed.wait()
        _wait_gone([sidecar], timeout=10)
        assert zygote.alive()

        last = engine("last")
        last.start(timeout=180)
        sidecar = last.pid
        assert not zygote.stop(grace=10).killed  # SIGTERM, as a container stop sends, is enough
        _wait_gone([sidecar], timeout=10)
        assert not (zygote_dir / "vllm.zygote").exists()
        last.close()
    finally:
        zygote.stop(grace=0.0)
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before if not n.startswith("timeshare-test-")}
    assert not left, f"vLLM left shared-memory segments behind: {left}"


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"still running after {timeout:g} s: {pids}"
        time.sleep(0.1)
