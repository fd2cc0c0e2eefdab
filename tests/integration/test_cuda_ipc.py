"""CUDA IPC for real: a region the trainer's writer shares is opened, verified and read by other processes,
and its memory goes back when the writer releases it, however many read it. GPU only (the whole job on a
GPU runs in scripts/device_check.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_engine.contracts.cuda_ipc import DeviceRegionWriter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA IPC shares GPU memory only"),
]

READER = """
import json, sys
import torch
from checkpoint_engine.contracts.weight_region import Manifest, WeightVerificationError, read_region
manifest = Manifest.from_dict(json.load(open(sys.argv[1])))
tensors = read_region(manifest)
out = {name: [str(t.device), t.reshape(-1)[:8].float().tolist()] for name, t in tensors}
raw = tensors[0][1].view(-1).view(torch.uint8)
raw[0] ^= 0xFF  # the reader's write lands in the producer's memory: the region is shared, not copied
try:
    read_region(manifest)
    out["corrupt"] = "accepted"
except WeightVerificationError:
    out["corrupt"] = "refused"
raw[0] ^= 0xFF
del tensors, raw
print(json.dumps(out))
"""


def test_another_process_reads_the_shared_region_verified(tmp_path: Path) -> None:
    torch.cuda.init()
    tensors = {
        "a.weight": torch.randn(1024, 1024).pin_memory(),
        "b.weight": torch.randn(4096).to(torch.bfloat16).pin_memory(),
    }
    before = torch.cuda.memory_reserved()
    writer = DeviceRegionWriter("ipc-test", "n0")
    manifest = writer.write(0, tensors)
    (tmp_path / "m.json").write_text(json.dumps(manifest.to_dict()))
    for _ in range(2):  # two readers of one share, as a vLLM and the one restarted after it in ROLLOUT
        proc = subprocess.run(
            [sys.executable, "-c", READER, str(tmp_path / "m.json")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).parents[2],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got.pop("corrupt") == "refused"
        for name, t in tensors.items():
            device, head = got[name]
            assert device.startswith("cuda"), name  # read where it lies: no host copy on the way
            assert head == t.reshape(-1)[:8].float().tolist(), name
    assert torch.cuda.memory_reserved() > before
    writer.release()  # torch's reader count is -1 by now: without clearing it the block would stay
    assert torch.cuda.memory_reserved() <= before
