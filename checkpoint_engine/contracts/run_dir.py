"""Where a run keeps its files: one place, so the launcher, the controller and the trainer ranks agree.

    <run>/config.json               the resolved TrainConfig (the launcher's; no other layer parses it)
    <run>/manifest.json             RunManifest: what the tools reading the run need of it
    <run>/model-init/               the initial HF model (written when model.path is null)
    <run>/cold_start.json           (prompt ids, answer ids) pairs for the supervised cold start
    <run>/rollouts/iter_00003.pt    the batch ROLLOUT of iteration 3 built; TRAIN of iteration 4 reads it
    <run>/checkpoints/iter_00004/   controller.json (sampler, buffer, RNG after ROLLOUT 3),
                                    trainer-rank{r}.pt (model, optimizer after TRAIN 4),
                                    train_metrics.json, COMPLETE (written last: the others' sha256)
    <run>/engine-node1.json         node1's engine config: its API's host, port and bearer token
    <run>/metrics.jsonl, tensorboard/, progress.png, logs/
A checkpoint of iteration i is the state at the end of TRAIN i; resuming restarts at EXPORT of i.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from checkpoint_engine.contracts.config import Section

log = logging.getLogger(__name__)


class RunManifest(Section):
    """What the head settled for the run that the tools reading its directory need (`timeshare export`),
    written once the model is ready, at the start and at each resume."""

    KEY = "manifest"
    model_dir: str  # the model the run started from: its model-init/ (the tiny one) or model.path
    trainer_tp: int = Field(ge=1)  # the tensor-parallel shards of each trainer checkpoint
    trainer_ep: int = Field(1, ge=1)  # the expert-parallel blocks of an MoE model's experts (TP is then 1)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def engine_config(self, node: str) -> Path:
        """The node's EngineConfig as JSON; the head's controller reads another node's token from it."""
        return self.root / f"engine-{node}.json"

    def engine_token(self, node: str) -> str | None:
        """The bearer token of `node`'s engine API (None on loopback), from its EngineConfig; an OSError when
        the document cannot be read."""
        return json.loads(self.engine_config(node).read_text()).get("token")

    @property
    def model_init(self) -> Path:
        return self.root / "model-init"

    @property
    def cold_start(self) -> Path:
        return self.root / "cold_start.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def batch(self, iteration: int) -> Path:
        return self.root / "rollouts" / f"iter_{iteration:05d}.pt"

    def checkpoint(self, iteration: int) -> Path:
        return self.root / "checkpoints" / f"iter_{iteration:05d}"

    def controller_state(self, iteration: int) -> Path:
        return self.checkpoint(iteration) / "controller.json"

    def trainer_state(self, iteration: int, rank: int) -> Path:
        return self.checkpoint(iteration) / f"trainer-rank{rank}.pt"

    def train_metrics(self, iteration: int) -> Path:
        """TRAIN's report, kept with the checkpoint: a resumed run starts after that TRAIN and logs it from here."""
        return self.checkpoint(iteration) / "train_metrics.json"

    def complete_marker(self, iteration: int) -> Path:
        return self.checkpoint(iteration) / "COMPLETE"

    def complete_checkpoints(self) -> list[int]:
        """The iterations whose checkpoints are complete (both halves written), oldest first."""
        return sorted(int(p.parent.name.removeprefix("iter_")) for p in self.root.glob("checkpoints/iter_*/COMPLETE"))

    def mark_complete(self, iteration: int) -> None:
        """Write checkpoint `iteration`'s COMPLETE, after every other file of it: their sha256, so that a
        resume can tell a checkpoint that a crash or a full disk damaged."""
        folder = self.checkpoint(iteration)
        # Not the marker, nor a COMPLETE.partial that a crash left in a checkpoint now written again.
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("COMPLETE"))
        marker = self.complete_marker(iteration)
        partial = marker.with_name(marker.name + ".partial")
        partial.write_text(json.dumps({"iteration": iteration, "sha256": {f.name: _sha256(f) for f in files}}))
        os.replace(partial, marker)

    def checkpoint_damage(self, iteration: int) -> str | None:
        """Why complete checkpoint `iteration` cannot be resumed from (a file missing or changed since it
        was written), or None when every file matches its checksum."""
        folder = self.checkpoint(iteration)
        try:
            sums = json.loads(self.complete_marker(iteration).read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return "its COMPLETE marker has no readable checksums"
        for name, digest in sums.items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if _sha256(folder / name) != digest:
                return f"{name} does not match its checksum"
        return None

    def latest_checkpoint(self) -> int | None:
        """The newest complete checkpoint whose files match their checksums, or None; a newer damaged one
        is logged as a warning naming it, why, and the checkpoint used instead."""
        damaged: list[str] = []
        for iteration in reversed(self.complete_checkpoints()):
            why = self.checkpoint_damage(iteration)
            if why is None:
                for line in damaged:
                    log.warning("%s; using checkpoint %s instead", line, self.checkpoint(iteration))
                return iteration
            damaged.append(f"checkpoint {self.checkpoint(iteration)} is damaged ({why})")
        for line in damaged:
            log.warning("%s; no earlier checkpoint is sound", line)
        return None

    def make(self) -> RunPaths:
        for d in (self.root, self.logs, self.root / "rollouts", self.root / "checkpoints"):
            d.mkdir(parents=True, exist_ok=True)
        return self


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
