"""Where a run keeps its files: one place, so the launcher, the controller and the trainer ranks agree.

    <run>/config.json               the resolved TrainConfig
    <run>/model-init/               the initial HF model (written when model.path is null)
    <run>/cold_start.json           (prompt ids, answer ids) pairs for the supervised cold start
    <run>/rollouts/iter_00003.pt    the batch ROLLOUT of iteration 3 built; TRAIN of iteration 4 reads it
    <run>/checkpoints/iter_00004/   controller.json (sampler, buffer, RNG after ROLLOUT 3),
                                    trainer-rank{r}.pt (model, optimizer after TRAIN 4),
                                    train_metrics.json, COMPLETE
    <run>/metrics.jsonl, tensorboard/, progress.png, logs/
A checkpoint of iteration i is the state at the end of TRAIN i; resuming restarts at EXPORT of i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

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

    def latest_checkpoint(self) -> int | None:
        """The newest iteration whose checkpoint is complete, or None."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def make(self) -> RunPaths:
        for d in (self.root, self.logs, self.root / "rollouts", self.root / "checkpoints"):
            d.mkdir(parents=True, exist_ok=True)
        return self
