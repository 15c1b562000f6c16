"""TensorBoard event files under <output_dir>/tensorboard/ (torch's SummaryWriter)."""

from __future__ import annotations

from typing import Any

from training.tracking.base import TrackedRun


class TensorBoardTracker:
    name = "tensorboard"
    run_key = None  # a resume rewinds by itself: purge_step hides events written after the checkpoint

    def __init__(self, tracked: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tracked.run.tensorboard), purge_step=tracked.start_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def state(self) -> dict[str, Any]:
        return {}

    def finish(self, outcome: str) -> None:
        self.writer.close()
