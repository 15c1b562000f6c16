"""What every experiment tracker implements, and the guard that keeps a failing one from stopping training."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

from training.run_dir import RunDir


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is opened with, on rank 0 once per launch."""

    run: RunDir
    config: dict[str, Any]  # the resolved config, plus run_dir (the run directory's absolute path)
    start_step: int  # the step training resumes after (0 for a fresh run)
    saved: dict[str, Any]  # this tracker's `state()` from the checkpoint resumed from ({} if none)


class Tracker(Protocol):
    """One experiment tracker. Metric names are TensorBoard's tags (`train/loss`); values are plain numbers."""

    name: str
    # the tracked run's identity ("wandb:<id>"), for runs that resume across launches; None for a tracker
    # that rewinds by itself (TensorBoard's purge_step)
    run_key: str | None

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def state(self) -> dict[str, Any]:
        """Plain types saved in each checkpoint, so a resumed or requeued job continues the same tracked run."""
        ...

    def finish(self, outcome: str) -> None:
        """The run ends: "completed", "preempted" (will be requeued) or "diverged"."""
        ...


def chart_name(key: str) -> str:
    """metrics.jsonl's `train.loss` -> `train/loss`: the first part is the section trackers group charts by."""
    return key.replace(".", "/", 1)


class Guarded:
    """A tracker whose failures (network, quota, a full disk) are reported once and never stop training:
    every call is still tried, so a tracker that recovers receives the later steps."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.failures = tracker, 0
        self.name, self.run_key = tracker.name, tracker.run_key

    def _call(self, what: str, method, *args) -> Any:
        try:
            return method(*args)
        except Exception as err:  # any failure of a tracker, by design
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"tracker {self.name} failed to {what} ({type(err).__name__}: {err}); training "
                              "goes on, metrics.jsonl has every step, further failures of this tracker are counted "
                              "silently", RuntimeWarning, stacklevel=3)
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._call(f"log step {step}", self.tracker.log, step, metrics)

    def state(self) -> dict[str, Any]:
        return self._call("report its state", self.tracker.state) or {}

    def finish(self, outcome: str) -> None:
        self._call("finish", self.tracker.finish, outcome)
        if self.failures:
            print(f"tracker {self.name}: {self.failures} call(s) failed in this launch; metrics.jsonl is complete",
                  flush=True)
