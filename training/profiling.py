"""A profiler window over chosen steps, and a CUDA memory snapshot of a step that runs out of memory.

  profile.steps=[a, b]      torch.profiler on `profile.ranks` (default rank 0) for optimizer steps a..b,
                            written by `tensorboard_trace_handler` as Chrome trace JSON,
                            <output_dir>/profile/rank<R>.<time>.pt.trace.json: TensorBoard's profiler
                            plugin (`tensorboard --logdir <output_dir>/profile`) and Perfetto
                            (ui.perfetto.dev) open it; steps are marked ProfilerStep#a..b
  profile.memory=true       also records every allocation with its shape and stack: the trace's memory
                            events (TensorBoard's Memory View draws them); on a GPU also the
                            window's CUDA memory snapshot, rank<R>_memory_steps<a>-<b>.pickle, whose
                            timeline pytorch.org/memory_viz draws (torch's recommended tool; the
                            profiler's own export_memory_timeline is deprecated and failed here on
                            DeepSpeed's graph)
  profile.oom_snapshot=true GPU: CUDA allocation history is recorded from the start; a step that raises
                            torch.OutOfMemoryError dumps it to oom_rank<R>_step<N>.pickle before the
                            error goes on (drag it into pytorch.org/memory_viz)

Off (the default) the trainer holds None for both: no profiler, no recording, nothing per step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from data.config import ConfigError
from training.config import ProfileSection

MEMORY_HISTORY_ENTRIES = 100_000  # allocation events kept (torch's own example uses 100,000)


def check_profile(settings: ProfileSection, device: torch.device, total_steps: int, world_size: int) -> None:
    """Before launch: the window lies inside the run on ranks that exist, and an OOM snapshot has a GPU."""
    if settings.steps and settings.steps[0] > total_steps:
        raise ConfigError(f"profile.steps {settings.steps} starts after the run's last step ({total_steps}): "
                          f"choose steps within 1..{total_steps}")
    if settings.steps and min(settings.ranks) >= world_size:
        raise ConfigError(f"profile.ranks {settings.ranks}: this run has ranks 0..{world_size - 1} only")
    if settings.oom_snapshot and device.type != "cuda":
        raise ConfigError(f"profile.oom_snapshot records CUDA memory and this run is on {device.type}: set "
                          "profile.oom_snapshot=false (or run on a GPU)")


class StepProfiler:
    """torch.profiler started before step `first` (or the first step this launch trains, if it resumes
    inside the window) and stopped after step `last`."""

    def __init__(self, settings: ProfileSection, rank: int, directory: Path, device: torch.device):
        self.first, self.last = settings.steps
        self.memory, self.rank, self.directory, self.device = settings.memory, rank, directory, device
        self.keep_recording = settings.oom_snapshot  # the OOM snapshot records CUDA memory all run long
        self.profiler: torch.profiler.profile | None = None
        self.started_at = 0

    def begin(self, step: int) -> None:
        if self.profiler is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, record_shapes=self.memory, profile_memory=self.memory,
                with_stack=self.memory,  # the memory timeline needs all three
                schedule=lambda _: torch.profiler.ProfilerAction.RECORD,  # we start and stop; this marks steps
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.directory),
                                                                        worker_name=f"rank{self.rank}"))
            self.profiler.step_num = step  # ProfilerStep#<our step>
            if self.memory and self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.profiler.start()
            self.started_at = step

    def end(self, step: int) -> None:
        if self.profiler is None:
            return
        if step < self.last:
            self.profiler.step()
            return
        try:
            self.profiler.stop()  # writes the trace
            if self.memory and self.device.type == "cuda":
                torch.cuda.memory._dump_snapshot(
                    str(self.directory / f"rank{self.rank}_memory_steps{self.started_at}-{step}.pickle"))
                if not self.keep_recording:
                    torch.cuda.memory._record_memory_history(enabled=None)
            print(f"rank {self.rank}: profile of steps {self.started_at}..{step} written to {self.directory}",
                  flush=True)
        except Exception as err:  # a profile never stops training (a full disk, say)
            warnings.warn(f"rank {self.rank}: the profile of steps {self.started_at}..{step} could not be written "
                          f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
        self.profiler = None
        self.first = self.last + 1  # done: a later step never starts it again


def step_profiler(settings: ProfileSection, rank: int, directory: Path, device: torch.device) -> StepProfiler | None:
    return StepProfiler(settings, rank, directory, device) if settings.steps and rank in settings.ranks else None


class OOMSnapshot:
    """Records the CUDA caching allocator's history (torch.cuda.memory._record_memory_history) from the start,
    so that a step that runs out of memory can dump what was allocated, by whom, when."""

    def __init__(self, rank: int, directory: Path):
        self.rank, self.directory = rank, directory
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    def dump(self, step: int) -> Path | None:
        """Called while the out-of-memory error propagates: never raises one of its own in its place."""
        path = self.directory / f"oom_rank{self.rank}_step{step}.pickle"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        except Exception as err:
            print(f"rank {self.rank}: out of memory in step {step}; the CUDA memory snapshot could not be written "
                  f"({type(err).__name__}: {err})", flush=True)
            return None
        print(f"rank {self.rank}: out of memory in step {step}; CUDA memory snapshot: {path} "
              "(open it at pytorch.org/memory_viz)", flush=True)
        return path


def oom_snapshot(settings: ProfileSection, rank: int, directory: Path) -> OOMSnapshot | None:
    return OOMSnapshot(rank, directory) if settings.oom_snapshot else None
