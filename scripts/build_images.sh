#!/usr/bin/env bash
# Builds one node's images, one per role, from docker/Dockerfile: timeshare-rl-trainer:$DEVICE and
# timeshare-rl-vllm:$DEVICE, with docker where its daemon answers, else podman. The vllm target is built from
# the trainer's layers (the same `env` stage), so the install runs once.
# Environment: DEVICE (cpu or gpu, default cpu), BASE (the base image; default the Dockerfile's),
# TORCH_INDEX_URL, BUILD_FLAGS (more flags for the builder).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
if docker info >/dev/null 2>&1; then tool=docker; elif command -v podman >/dev/null; then tool=podman; else
  echo "[images] need docker (with a running daemon) or podman"; exit 1
fi
args=(--build-arg "DEVICE=$DEVICE" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" -f docker/Dockerfile)
[ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")
# shellcheck disable=SC2206 # BUILD_FLAGS is a list of flags
args+=(${BUILD_FLAGS:-})
for role in trainer vllm; do
  echo "[images] $tool build --target $role -t timeshare-rl-$role:$DEVICE"
  "$tool" build "${args[@]}" --target "$role" -t "timeshare-rl-$role:$DEVICE" .
done
