"""The learning-rate plan: linear warmup, then decay, and what a resumed run does when its length changes.

A plan is a list of segments. The first is planned when the run starts; each extension of the run
(a resume with a larger or smaller `train_steps`/`train_tokens`, `schedule.on_extend`) adds one that
starts at the step where the run was resumed:

  initial   warm up from 0 to the peak over `warmup` steps, then decay to min_lr_ratio x peak at step total - 1
  continue  no warmup: decay from the multiplier the run had reached to the floor at the new end (a finished
            run, already at the floor, stays there)
  rewarm    warm up from the multiplier the run had reached back to the peak (schedule.warmup_steps, or
            warmup_fraction of the remaining steps), then decay to the floor at the new end

Steps count applied optimizer updates, the scheduler's own count (a skipped non-finite step does not
advance it). Every checkpoint carries the plan (`Trainer.client_state`), so a resumed run follows
the plan it was trained with, and a changed total is refused before launch unless `on_extend` says
what to do (`check_extension`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from data.config import ConfigError
from training.config import ScheduleSection


def warmup_steps(config: ScheduleSection, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return int(config.warmup_fraction * total_steps)


@dataclass(frozen=True)
class Segment:
    """Steps [start, total) of the plan: warmup from `begin` to `peak`, then `decay` to `floor` at step total - 1."""

    start: int
    total: int
    warmup: int
    begin: float
    peak: float
    decay: str
    floor: float
    mode: str  # initial, continue or rewarm

    def multiplier(self, step: int) -> float:
        local, length = step - self.start, self.total - self.start
        if local < self.warmup:
            return self.begin + (self.peak - self.begin) * (local + 1) / self.warmup
        if self.decay == "constant" or length <= self.warmup + 1:
            return self.peak
        progress = min(1.0, (local - self.warmup) / (length - self.warmup - 1))
        if self.decay == "linear":
            return self.peak - (self.peak - self.floor) * progress
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRPlan:
    segments: tuple[Segment, ...]

    @classmethod
    def initial(cls, config: ScheduleSection, total_steps: int) -> LRPlan:
        return cls((Segment(0, total_steps, warmup_steps(config, total_steps), 0.0, 1.0, config.decay,
                            config.min_lr_ratio, "initial"),))

    @property
    def total(self) -> int:
        return self.segments[-1].total

    def multiplier(self, step: int) -> float:
        """Factor on the peak lr for optimizer step `step` (0-based)."""
        return next(s for s in reversed(self.segments) if s.start <= step).multiplier(step)

    def extended(self, step: int, total_steps: int, mode: str, config: ScheduleSection) -> LRPlan:
        """The plan with a new segment from `step` to `total_steps` (see the module docstring)."""
        begin = self.multiplier(step)
        if mode == "continue":
            segment = Segment(step, total_steps, 0, begin, begin, config.decay, config.min_lr_ratio, mode)
        else:
            segment = Segment(step, total_steps, warmup_steps(config, total_steps - step), begin, 1.0,
                              config.decay, config.min_lr_ratio, mode)
        return LRPlan((*self.segments, segment))

    def state(self) -> list[dict]:
        return [asdict(segment) for segment in self.segments]

    @classmethod
    def from_state(cls, state: list[dict]) -> LRPlan:
        return cls(tuple(Segment(**segment) for segment in state))


def build_scheduler(optimizer: torch.optim.Optimizer, plan: Callable[[], LRPlan]) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped by DeepSpeed after every applied optimizer step; its position travels in DeepSpeed's checkpoint,
    the plan (`plan()`, read at every step: an extension replaces it) in ours."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plan().multiplier(step))


def apply_plan(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's lr to what the (changed) plan gives the scheduler's current step."""
    scheduler.last_epoch -= 1
    scheduler.step()


def check_extension(saved_plan: list[dict] | None, trained_steps: int, total_steps: int,
                    config: ScheduleSection, where: str) -> None:
    """A resume whose total differs from the checkpoint's plan must say how the schedule continues."""
    if saved_plan is None:
        return
    planned = LRPlan.from_state(saved_plan).total
    if planned == total_steps:
        return
    if total_steps < trained_steps:
        raise ConfigError(f"{where} has trained {trained_steps} steps, more than the {total_steps} this config "
                          "asks for: raise train_steps/train_tokens, or use a new output_dir")
    if config.on_extend is None:
        raise ConfigError(f"{where} was planned for {planned} steps, this config asks for {total_steps}: set "
                          "schedule.on_extend=continue (decay from the current learning rate to the new end, no "
                          "warmup) or schedule.on_extend=rewarm (warm up to the peak again, then decay), or keep "
                          "train_steps/train_tokens as they were")
