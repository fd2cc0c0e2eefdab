#!/usr/bin/env bash
# The device check: the real job on one GPU (an H100 or H200), nothing downloaded, under 10 minutes, one
# JSON line per measure.
#   scripts/device_check.sh [more Hydra overrides for both runs]
# It runs `timeshare bench cycle` (launch/bench_cycle.py) for both vLLM lifecycles (keep_alive with vLLM asleep
# between rollouts, rollout.sleep_level=1), 3 iterations each, on a
# Qwen2.5-0.5B-shaped model with random weights that the launcher writes (24 layers, hidden 896, 14 heads,
# 2 KV heads, SwiGLU 4864, tied embeddings; the project's BPE vocabulary instead of Qwen's 151,936), in
# bfloat16. Its lines: each phase's seconds, the switch train -> rollout and rollout -> train, the push's GB/s
# (by CUDA IPC: transfer.local=auto on a GPU; `via` says which path ran) next to a device-to-device copy of as
# many bytes, rollout tokens/s against a standalone vLLM, the logprob
# gap, and the device's memory (the trainer's GPU before and after OFFLOAD, each GPU's free memory before
# vLLM starts and once it is gone).
# Needs the GPU stack in $PYTHON's environment: the Docker `gpu` target, or
#   VENV=.venv-gpu EXTRAS=gpu,dev LOCK=requirements/lock-gpu.txt scripts/install.sh
# (vLLM's CUDA build, CUDA torch, megatron-core, etcd). CI never runs this; tests/unit/test_device_check.py
# checks that it parses and that its overrides make a valid config.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-gpu/bin/python}
LIMIT=${LIMIT:-450}  # seconds for both runs of the bench together (the GPU tests before them: at most 120)

OVERRIDES=(
  model.arch=qwen2
  model.tokenizer=bpe
  model.layers=24
  model.hidden=896
  model.heads=14
  model.kv_heads=2
  model.intermediate=4864
  model.tie_embeddings=true
  model.max_positions=1024
  model.dtype=bfloat16
  rollout.max_model_len=1024
  rollout.kv_cache_gib=null
  rollout.gpu_memory_utilization=0.3
)

fail() { echo "{\"check\": \"device\", \"error\": \"$*\"}"; exit 1; }

command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this check needs an NVIDIA GPU"
[ -x "$PYTHON" ] || fail "no $PYTHON: install the GPU stack (see the head of $0) or set PYTHON"
"$PYTHON" - <<'EOF' || fail "the GPU stack is not importable with $PYTHON (CUDA torch, vllm, megatron.core)"
import json

import megatron.core  # noqa: F401
import torch
import vllm

assert torch.cuda.is_available(), "torch sees no GPU"
free, total = torch.cuda.mem_get_info()
print(json.dumps({
    "check": "device", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "vllm": vllm.__version__,
    "free_bytes": free, "total_bytes": total,
}))
EOF
# The GPU-only tests first (CUDA IPC between processes, the Megatron GPU path): one line with their outcome.
if timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_cuda_ipc.py \
    tests/integration/test_megatron.py >"${TMPDIR:-/tmp}/device_check_tests.log" 2>&1; then
  echo '{"check": "gpu_tests", "passed": true}'
else
  echo "{\"check\": \"gpu_tests\", \"passed\": false, \"log\": \"${TMPDIR:-/tmp}/device_check_tests.log\"}"
fi
# keep_alive sleeps at level 1 between rollouts (vLLM's weights to host memory, its KV cache freed).
exec timeout "$LIMIT" "$PYTHON" -m launch.cli bench cycle --iterations 3 --sleep-level 1 "${OVERRIDES[@]}" "$@"
