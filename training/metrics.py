"""Rank 0's metrics sink: an append-only metrics.jsonl, the experiment trackers, a progress line, and
the curves (curves.png) when the run ends.

metrics.jsonl is the record of truth: each record is written there first, then fanned out to the
trackers of `logging.trackers` (`training/tracking/`) at the same step under TensorBoard's names
(`train/loss`). On resume metrics.jsonl is cut back to the checkpoint's step by rewriting it without
the records of steps that are about to be trained again, so every step appears once and the file
tells the history of the weights that exist; TensorBoard rewinds too (`purge_step`), while W&B and
MLflow runs are not sent the steps they already hold (`training/tracking/ledger.py`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from data.artifacts import write_text_atomic
from training.config import LoggingSection
from training.run_dir import RunDir
from training.tracking.base import chart_name


def truncate_jsonl(path: Path, last_step: int) -> int | None:
    """Drop records with step > last_step (written after the checkpoint we resume from); returns the
    largest step the file held before (None: no file or no records)."""
    if not path.exists():
        return None
    kept, largest = [], None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the previous run was killed
        step = record.get("step", 0)
        largest = step if largest is None else max(largest, step)
        if step <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return largest


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger that does nothing."""

    def __init__(self, run: RunDir, enabled: bool, start_step: int, total_steps: int, logging: LoggingSection,
                 config: dict[str, Any], tracker_states: dict[str, dict]):
        """`config`: the resolved config, the trackers' run config; `tracker_states`: the trackers' state
        saved in the checkpoint resumed from."""
        self.enabled, self.total_steps, self.print_every = enabled, total_steps, logging.every_steps
        self.start_step, self.started = start_step, time.perf_counter()
        self.run, self.path = run, run.metrics
        self.trackers: list = []  # (tracker, the last step its tracked run already holds)
        self.saved_states = tracker_states  # kept for a tracker that cannot start in this launch
        if not enabled:
            return
        from training.tracking import StepLedger, TrackedRun, open_trackers

        ledger = StepLedger(run.trackers, truncate_jsonl(self.path, start_step))
        tracked = TrackedRun(run, {**config, "run_dir": str(run.root.resolve())}, start_step, tracker_states)
        opened = open_trackers(logging, tracked)
        ledger.begin([t.run_key for t in opened if t.run_key])
        self.trackers = [(tracker, ledger.last_step(tracker.run_key)) for tracker in opened]

    def log(self, step: int, metrics: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers:
            values = {chart_name(k): float(v) for k, v in record.items()
                      if k != "step" and isinstance(v, (int, float))}
            for tracker, held in self.trackers:
                if step > held:
                    tracker.log(step, values)

    def tracker_states(self) -> dict[str, dict]:
        """What each tracker needs to continue its tracked run after a resume (rank 0; {} elsewhere)."""
        current = {tracker.name: state for tracker, _ in self.trackers if (state := tracker.state())}
        return {**self.saved_states, **current} if self.enabled else {}

    def progress(self, step: int, metrics: dict[str, float | int | None]) -> None:
        if not self.enabled or (step % self.print_every and step != self.total_steps):
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total_steps - step) if done else math.inf
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['train.loss']:.4f}",
                 f"lr {metrics['train.lr']:.3g}"]
        if metrics.get("train.grad_norm") is not None:
            parts.append(f"grad {metrics['train.grad_norm']:.3f}")
        parts.append(f"{metrics['perf.tokens_per_s']:,.0f} tok/s")
        if metrics.get("perf.mfu") is not None:
            parts.append(f"MFU {metrics['perf.mfu']:.1%}")
        parts += [f"data {metrics['perf.data_wait_fraction']:.1%}", f"mem {metrics['perf.memory_gb']:.1f} GB",
                  f"eta {format_eta(eta)}"]
        print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self, outcome: str) -> None:
        """The run ends ("completed", "preempted", "diverged"): trackers finish, curves.png is drawn."""
        if not self.enabled:
            return
        for tracker, _ in self.trackers:
            tracker.finish(outcome)
        self.trackers = []
        try:
            from training.curves import plot_runs

            plot_runs([self.run.root], self.run.curves)
        except Exception as err:  # a picture never fails a run
            warnings.warn(f"could not draw {self.run.curves} ({type(err).__name__}: {err})", RuntimeWarning,
                          stacklevel=2)
