"""A checkpoint of a run as an HF model directory: config, tokenizer and one safetensors file.

Consumes a run directory (its `manifest.json` names the model the run started from and the trainer's
tensor parallelism) and one complete checkpoint;
produces a directory that transformers and vLLM load like the model the run started from. Runs offline, without
torch.distributed: each TP rank's shard of every parameter is read from its `trainer-rank<r>.pt`
(ranks 0..tp-1 hold TP ranks 0..tp-1 of the first data-parallel replica) and merged as the live
export merges them (`convert.tp_merge`, then `convert.megatron_to_hf`). An MoE run's experts are
read from ranks 0..ep-1 instead (TP is 1 there; rank r holds the r-th block of experts).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint_engine.contracts.config import ConfigError
from checkpoint_engine.contracts.run_dir import RunManifest, RunPaths
from sidecars.megatron.arch import ModelArch
from sidecars.megatron.convert import (
    ep_local_name,
    expert_index,
    has_fused_norms,
    megatron_to_hf,
    megatron_weights,
    tp_merge,
)


class ExportError(ConfigError):
    """The run directory has no checkpoint to export as asked."""


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, iteration: int | None = None) -> Path:
    """Write checkpoint `iteration` (default: the newest complete one) of `run_dir` to `out_dir`."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.exists():
        raise ExportError(f"{run_dir} is not a run directory (no {paths.config.name})")
    complete = paths.complete_checkpoints()
    if not complete:
        raise ExportError(f"{run_dir} has no complete checkpoint yet")
    if iteration is None:
        iteration = paths.latest_checkpoint()  # the newest sound one
        if iteration is None:
            raise ExportError(f"{run_dir}: every complete checkpoint is damaged (see the warnings above)")
    elif iteration not in complete:
        raise ExportError(f"{run_dir} has no complete checkpoint {iteration}; complete ones: {complete}")
    elif (damage := paths.checkpoint_damage(iteration)) is not None:
        raise ExportError(f"checkpoint {paths.checkpoint(iteration)} is damaged: {damage}")
    if not paths.manifest.is_file():
        raise ExportError(f"{run_dir} has no {paths.manifest.name}, which every run writes as it starts")
    manifest = RunManifest.from_json_file(paths.manifest)
    started = Path(manifest.model_dir)
    ranks = max(manifest.trainer_ep, manifest.trainer_tp)  # EP needs TP 1: EP blocks of experts or TP shards
    shards = [_model_state(paths.trainer_state(iteration, rank)) for rank in range(ranks)]
    arch = ModelArch.from_pretrained(started)
    if manifest.trainer_ep > 1:
        merged = _merge_experts(shards, arch)
    else:
        merged = {name: tp_merge(name, [s[name] for s in shards]) for name in shards[0]}
    tensors = megatron_to_hf(merged, arch, fused_norms=has_fused_norms(merged))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in started.iterdir():  # config, generation config, tokenizer: everything but the weights
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "timeshare_iteration": str(iteration)})
    return out


def _merge_experts(states: list[dict[str, torch.Tensor]], arch: ModelArch) -> dict[str, torch.Tensor]:
    """The full model from each EP rank's state: dense tensors from the first, experts by global index."""
    if arch.moe is None:
        raise ExportError(f"the run's manifest says expert parallel {len(states)} but its model is dense")
    per_rank = arch.moe.count // len(states)
    merged: dict[str, torch.Tensor] = {}
    for rank, state in enumerate(states):
        for name, t in state.items():
            if expert_index(name) is not None:
                merged[ep_local_name(name, rank * per_rank)] = t
            elif rank == 0:
                merged[name] = t
    return merged


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return megatron_weights(torch.load(path, map_location="cpu", weights_only=False)["model"])
