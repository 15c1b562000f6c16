"""Hang watchdog: a step that runs far longer than usual leaves every rank's Python stacks in the run
directory and a log line naming the rank that is behind.

Each rank runs a daemon thread that watches the step in progress. When it has run `slow_factor` times
the median of the last `window` steps (and at least `min_seconds`), the thread writes
`<run>/watchdog/step_N/rank_R.txt`: one JSON status line (where this rank is: micro-batch and phase:
data, forward, backward, optimizer step, step-end all-reduce) followed by faulthandler's dump of every
thread's stack. Rank 0 then reads the other ranks' status lines (the run directory is shared) and logs
which rank is behind: the ranks ahead of it wait for it inside a collective. Nothing here calls a
collective, so a hung process group cannot block it; training goes on, and a hang that never resolves
ends at the process group's timeout (`distributed.timeout_minutes`).
"""

from __future__ import annotations

import faulthandler
import json
import statistics
import threading
import time
from collections import deque
from pathlib import Path

from training.run_dir import tag_for

PHASES = ("data", "forward", "backward", "optimizer step", "step-end all-reduce")


class StepWatchdog:
    def __init__(self, directory: Path, rank: int, world_size: int, slow_factor: float, min_seconds: float,
                 window: int, poll_s: float = 0.25, gather_s: float = 10.0):
        self.directory, self.rank, self.world_size = Path(directory), rank, world_size
        self.slow_factor, self.min_seconds, self.poll_s, self.gather_s = slow_factor, min_seconds, poll_s, gather_s
        self._durations: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._step, self._started, self._reported = 0, None, 0
        self._position = (0, 0)  # (micro-batch, index in PHASES): one tuple, replaced atomically
        self._stop = threading.Event()
        self._thread = None
        if slow_factor > 0:
            self._thread = threading.Thread(target=self._watch, name="shorten-watchdog", daemon=True)
            self._thread.start()

    def begin(self, step: int) -> None:
        with self._lock:
            self._step, self._started = step, time.monotonic()
        self.mark(0, "data")

    def mark(self, micro_batch: int, phase: str) -> None:
        self._position = (micro_batch, PHASES.index(phase))

    def end(self) -> None:
        with self._lock:
            if self._started is not None:
                self._durations.append(time.monotonic() - self._started)
            self._started = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.gather_s + 5)

    def _limit(self) -> tuple[float, float] | None:
        """(seconds after which the current step is late, the median step) once 3 steps were timed."""
        if len(self._durations) < 3:
            return None
        median = statistics.median(self._durations)
        return max(self.min_seconds, self.slow_factor * median), median

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step, started, limit = self._step, self._started, self._limit()
            if started is None or limit is None or step == self._reported:
                continue
            elapsed = time.monotonic() - started
            if elapsed >= limit[0]:
                self._reported = step
                self._report(step, elapsed, limit[1])

    def _report(self, step: int, elapsed: float, median: float) -> None:
        folder = self.directory / tag_for(step)
        folder.mkdir(parents=True, exist_ok=True)
        micro_batch, phase = self._position
        status = {"rank": self.rank, "step": step, "micro_batch": micro_batch, "phase": PHASES[phase],
                  "elapsed_s": round(elapsed, 3), "median_step_s": round(median, 3)}
        path = folder / f"rank_{self.rank:05d}.txt"
        with open(path, "w") as handle:
            handle.write(json.dumps(status) + "\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        print(f"[rank {self.rank}] watchdog: step {step} has run {elapsed:.1f} s, {elapsed / median:.0f}x the "
              f"median step ({median:.2f} s), in {PHASES[phase]} of micro-batch {micro_batch}: stacks in {path}",
              flush=True)
        if self.rank == 0:
            print(self._name_late_ranks(folder, step), flush=True)

    def _statuses(self, folder: Path) -> dict[int, dict]:
        found = {}
        for path in folder.glob("rank_*.txt"):
            try:
                status = json.loads(path.read_text().split("\n", 1)[0])
            except (OSError, json.JSONDecodeError):
                continue  # being written: read again
            found[status["rank"]] = status
        return found

    def _name_late_ranks(self, folder: Path, step: int) -> str:
        """Which ranks are behind the others at this step, from the status lines every rank wrote."""
        deadline = time.monotonic() + self.gather_s
        statuses = self._statuses(folder)
        while len(statuses) < self.world_size and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(self.poll_s)
            statuses = self._statuses(folder)
        silent = sorted(set(range(self.world_size)) - set(statuses))
        if silent:
            return (f"watchdog: step {step}: rank(s) {silent} wrote no stacks within {self.gather_s:.0f} s: "
                    f"late, and stuck outside Python or dead; the others' stacks are in {folder}")

        def position(status: dict) -> tuple[int, int, int]:
            return status["step"], status["micro_batch"], PHASES.index(status["phase"])

        behind = min(position(s) for s in statuses.values())
        late = sorted(rank for rank, s in statuses.items() if position(s) == behind)
        where = f"{PHASES[behind[2]]} of micro-batch {behind[1]}"
        if len(late) == self.world_size:
            return (f"watchdog: step {step}: every rank is in {where}: no rank is behind the others (slow "
                    f"storage, network or a collective); stacks in {folder}")
        return (f"watchdog: step {step}: rank(s) {late} late, still in {where}; the other ranks wait for them "
                f"in a collective; stacks in {folder}")
