"""Rank 0's metrics sink: TensorBoard, an append-only metrics.jsonl, and a progress line.

On resume both are cut back to the checkpoint's step: TensorBoard through `purge_step`, and
metrics.jsonl by rewriting it without the records of steps that are about to be trained again, so
every step appears once and the files tell the history of the weights that exist.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from data.artifacts import write_text_atomic
from training.run_dir import RunDir


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records with step > last_step (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the previous run was killed
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger that does nothing."""

    def __init__(self, run: RunDir, enabled: bool, start_step: int, total_steps: int, tensorboard: bool,
                 print_every: int):
        self.enabled, self.total_steps, self.print_every = enabled, total_steps, print_every
        self.start_step, self.started = start_step, time.perf_counter()
        self.path = run.metrics
        self.writer = None
        if not enabled:
            return
        truncate_jsonl(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.tensorboard), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace(".", "/", 1), value, step)

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
