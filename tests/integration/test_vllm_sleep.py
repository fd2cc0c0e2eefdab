"""keep_alive with vLLM's sleep mode on a GPU (rollout.sleep_level): a sidecar put to sleep gives its device
memory back (NVML), wakes, takes a verified push and serves what it served before. CUDA only: vLLM's sleep mode
is its CUDA memory allocator; on a machine without a GPU every test here is skipped, and the config refuses
rollout.sleep_level (tests/unit/test_train_config.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from checkpoint_engine.contracts.vllm_client import SidecarError
from checkpoint_engine.contracts.vllm_protocol import GenerationRequest, VllmSettings
from checkpoint_engine.contracts.weight_region import remove_region, write_region
from checkpoint_engine.device_memory import GIB, read_gpus
from checkpoint_engine.vllm_process import VllmProcess
from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.etcd_server import free_loopback_ports
from sidecars.megatron.model import read_hf_tensors

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a CUDA device; none here"),
]


@pytest.mark.parametrize("level", [1, 2])
def test_a_sleeping_vllm_gives_its_device_memory_back_and_serves_again_once_woken(tmp_path: Path, level: int) -> None:
    model_dir = write_tiny_model(tmp_path / "model", TinyModelSpec(layers=2, hidden=128, heads=4))
    weights = read_hf_tensors(model_dir)
    names = [f"timeshare-test-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    settings = VllmSettings(
        model_dir=str(model_dir),
        port=free_loopback_ports(1)[0],
        tensor_parallel=1,
        gpu_memory_utilization=0.2,
        max_model_len=512,
        dtype="float32",
        seed=0,
        sleep_mode=True,
    )
    vllm = VllmProcess(settings, tmp_path / "vllm.log")
    try:
        before = read_gpus()
        assert before is not None, "a CUDA device but no NVML"
        vllm.start()
        vllm.client.update_weights(write_region(names[0], 1, weights).to_dict())
        greedy = GenerationRequest(prompt_ids=[1, 20, 21, 22], max_tokens=10, temperature=0.0, ignore_eos=True)
        served = vllm.client.generate([greedy]).results[0].samples[0].token_ids
        awake = read_gpus()
        assert awake is not None
        assert awake[0].used - before[0].used > 0.1 * before[0].total  # its KV cache: 20 % of the GPU

        assert vllm.client.sleep(level).asleep == level
        asleep = read_gpus()
        assert asleep is not None
        assert asleep[0].used - before[0].used < GIB  # a CUDA context is left, not the cache
        assert vllm.client.health().asleep == level
        with pytest.raises(SidecarError, match="asleep"):
            vllm.client.generate([greedy])

        vllm.client.wake_up()
        vllm.client.update_weights(write_region(names[1], 2, weights).to_dict())  # level 2 discarded the weights
        again = vllm.client.generate([greedy]).results[0].samples[0]
        assert (again.token_ids, again.weight_version) == (served, 2)
    finally:
        vllm.close()
        for name in names:
            remove_region(name)
