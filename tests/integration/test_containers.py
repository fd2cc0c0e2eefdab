"""One node in containers per role, run for real: docker/compose.yaml's two services, started with podman as
compose lays them out (the vLLM container in the trainer container's IPC, PID and network namespaces, one
volume in both), run a small job whose every rollout comes from a vLLM the vLLM container's zygote forked;
the vLLM container ends with the trainer's.

Needs podman and the images (`bash scripts/build_images.sh`, after `scripts/container_base.sh` where no registry
can be pulled from); skipped without them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.train_job import OVERRIDES, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
IMAGES = [s["image"] for s in COMPOSE["services"].values()]


def _image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0


def _podman_run(service: dict, name: str, prefix: str, shared: Path) -> list[str]:
    """`podman run` for a compose service: its image, namespaces, volume (the named one at `shared`) and init."""
    args = ["podman", "run", "--name", name]
    for key, flag in (("ipc", "--ipc"), ("pid", "--pid"), ("network_mode", "--network")):
        value = service.get(key)
        if value:
            args += [flag, value.replace("service:", f"container:{prefix}-")]
    if service.get("init"):
        args.append("--init")
    if service.get("shm_size"):
        args += ["--shm-size", service["shm_size"]]
    for volume in service.get("volumes", []):
        args += ["-v", f"{shared}:{volume.split(':', 1)[1]}"]
    return [*args, service["image"], *service.get("command", [])]


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_a_node_in_two_containers_runs_a_job(tmp_path: Path) -> None:
    missing = [i for i in IMAGES if not _image_exists(i)]
    if missing:
        pytest.skip(f"no image {missing}: build them with scripts/build_images.sh")
    prefix, shared = f"timeshare-test-{uuid.uuid4().hex[:6]}", tmp_path / "shared"
    shared.mkdir()
    services = COMPOSE["services"]
    small = [o for o in OVERRIDES if not o.startswith("run.iterations=")] + ["run.iterations=2"]
    names = {role: f"{prefix}-{role}" for role in services}
    try:
        for role, extra in (("trainer", small), ("vllm", [])):  # compose's order: vllm depends on trainer
            command = _podman_run(services[role], names[role], prefix, shared) + extra
            subprocess.run([*command[:2], "-d", *command[2:]], check=True, capture_output=True)
        status = subprocess.run(
            ["podman", "wait", names["trainer"]], capture_output=True, text=True, timeout=900, check=True
        ).stdout.strip()
        logs = {
            r: subprocess.run(["podman", "logs", n], capture_output=True, text=True, check=True)
            for r, n in names.items()
        }
        assert status == "0", logs["trainer"].stdout[-4000:] + logs["trainer"].stderr[-4000:]
        subprocess.run(["podman", "wait", names["vllm"]], capture_output=True, timeout=30, check=True)
    finally:
        for name in reversed(names.values()):  # the vLLM container first: it holds the trainer's namespaces
            subprocess.run(["podman", "rm", "-f", "-t", "5", name], check=False, capture_output=True)
    left = subprocess.run(
        ["podman", "ps", "-a", "-q", "--filter", f"name={prefix}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not left, f"containers left behind: {left}"
    (run_dir,) = (shared / "runs").iterdir()
    history = {int(r["iteration"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for i in range(2):
        assert history[i]["rollout/weight_version"] == i
    vllm_log = (run_dir / "logs" / "vllm-node0.log").read_text()
    assert "vLLM zygote ready" not in vllm_log  # the trainer's container spawned no vLLM of its own
    assert logs["vllm"].stdout.count("vLLM sidecar pid") == vllm_log.count("vLLM built:") >= 2
