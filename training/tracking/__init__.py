"""Experiment trackers on rank 0: TensorBoard, Weights & Biases, MLflow (`logging.trackers`).

  check_trackers(logging)            before launch: packages installed (naming the extra), W&B credentials
  open_trackers(logging, tracked)    on rank 0: the trackers, each behind a guard (`base.Guarded`)

Each tracker is one module implementing `base.Tracker` (log / state / finish); `training/metrics.py`
fans every metrics.jsonl record out to them at its step, and the trainer saves their `state()` (the
tracked run's id) in each checkpoint, so a resumed or requeued job continues the same tracked run.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import replace

from data.config import ConfigError
from training.config import LoggingSection
from training.tracking.base import Guarded, TrackedRun, Tracker
from training.tracking.ledger import StepLedger

__all__ = ["StepLedger", "TrackedRun", "Tracker", "check_trackers", "open_trackers"]

# tracker -> (the package it needs, the pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_trackers(logging: LoggingSection) -> None:
    """Every rank, before launch: each tracker asked for can run here."""
    for name in logging.trackers:
        package, extra = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            install = f"pip install 'shorten[{extra}]'" if extra else f"pip install {package}"
            raise ConfigError(f"logging.trackers has {name} but the {package} package is not installed: {install}, "
                              f"or remove {name} from logging.trackers")
    if "wandb" in logging.trackers:
        from training.tracking.wandb_tracker import check

        check(logging.wandb)


def open_tracker(name: str, logging: LoggingSection, tracked: TrackedRun) -> Tracker:
    if name == "tensorboard":
        from training.tracking.tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker(tracked)
    if name == "wandb":
        from training.tracking.wandb_tracker import WandbTracker

        return WandbTracker(tracked, logging.wandb)
    from training.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracked, logging.mlflow)


def open_trackers(logging: LoggingSection, tracked: TrackedRun) -> list[Guarded]:
    """The trackers of `logging.trackers`; one that cannot start (a server down) is left out with a warning."""
    opened = []
    for name in logging.trackers:
        try:
            tracker = open_tracker(name, logging, replace(tracked, saved=tracked.saved.get(name, {})))
        except Exception as err:  # a tracker never stops training
            warnings.warn(f"tracker {name} could not start ({type(err).__name__}: {err}); training goes on without "
                          "it (metrics.jsonl has every step)", RuntimeWarning, stacklevel=2)
            continue
        opened.append(Guarded(tracker))
    return opened
