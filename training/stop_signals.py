"""Stop requests by signal, for the entry scripts to install before their heavy imports.

SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, `scontrol requeue`,
the deepspeed launcher passing on its own SIGTERM) only append to a list: no I/O in the handler.
The trainer polls `requested()` at each step boundary and the ranks agree on it there. Installed
early because SIGUSR1's default action kills a process still importing torch and DeepSpeed.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped after committing a checkpoint, run again
_received: list[int] = []


def _record(signum: int, frame) -> None:
    _received.append(signum)


def install() -> None:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _record)


def requested() -> bool:
    return bool(_received)


def exit_code(outcome: str) -> int:
    """The process exit code of a training outcome: 0 completed, 75 preempted (checkpoint committed)."""
    return PREEMPTED_EXIT_CODE if outcome == "preempted" else 0
