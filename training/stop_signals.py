"""Stop requests by signal, for the entry scripts to install before their heavy imports.

SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, `scancel`, `scontrol
requeue`, a launcher passing on its own SIGTERM) only record the signal and its time: no I/O in the
handler. The trainer polls `requested()` at each step boundary and the ranks agree on it there.
Installed early because SIGUSR1's default action kills a process still importing torch and DeepSpeed.
Slurm signals every process of the job step, DataLoader workers included: the workers ignore these
signals (`data/loader.py`), so they neither die before the rank commits nor stop it.
"""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped after committing a checkpoint, run again
DIVERGED_EXIT_CODE = 3  # too many optimizer steps in a row with a non-finite loss or gradient norm
_received: list[tuple[int, float]] = []


def _record(signum: int, frame) -> None:
    _received.append((signum, time.monotonic()))


def install() -> None:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _record)


def requested() -> bool:
    return bool(_received)


def exit_code(outcome: str, rank: int) -> int:
    """The process exit code of a training outcome: 0 completed, 75 preempted (checkpoint committed),
    3 diverged. A preempted rank says how long the stop took, from the first signal to its exit."""
    code = {"preempted": PREEMPTED_EXIT_CODE, "diverged": DIVERGED_EXIT_CODE}.get(outcome, 0)
    if outcome == "preempted" and _received:
        signum, at = _received[0]
        print(f"[rank {rank}] {signal.Signals(signum).name} to committed checkpoint: "
              f"{time.monotonic() - at:.2f} s; exit code {code}", flush=True)
    return code
