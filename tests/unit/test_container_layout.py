"""docker/compose.yaml lays out one node as the code expects it: the vLLM container joins the trainer
container's IPC, PID and network namespaces, both mount one volume, the trainer's command names the directory
the zygote serves, and both roles are targets of docker/Dockerfile."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from launch.config_loading import load_config
from tests.integration.train_job import REPO

COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def _mounts(service: dict) -> set[str]:
    return {v.split(":")[1] for v in service["volumes"]}


def test_the_vllm_container_joins_the_trainers_namespaces() -> None:
    trainer, vllm = COMPOSE["services"]["trainer"], COMPOSE["services"]["vllm"]
    assert trainer["ipc"] == "shareable"
    assert (vllm["ipc"], vllm["pid"], vllm["network_mode"]) == ("service:trainer",) * 3
    assert vllm["depends_on"] == ["trainer"]


def test_the_trainer_names_the_directory_the_zygote_serves_on_their_shared_volume() -> None:
    trainer, vllm = COMPOSE["services"]["trainer"], COMPOSE["services"]["vllm"]
    shared = _mounts(trainer) & _mounts(vllm)
    assert trainer["command"][0] == "train"
    cfg = load_config(trainer["command"][1:])  # valid overrides
    (zygote_dir,) = vllm["command"]
    assert cfg.cluster.vllm_zygote == zygote_dir
    for path in (zygote_dir, cfg.run.root):  # the run directory holds the model vLLM loads and its log
        assert any(Path(path).is_relative_to(m) for m in shared), f"{path} is not on a volume both mount"


def test_each_role_is_a_target_of_the_dockerfile() -> None:
    targets = re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    for role, service in COMPOSE["services"].items():
        assert service["build"]["target"] == role in targets
        assert service["image"].startswith(f"timeshare-rl-{role}:")
