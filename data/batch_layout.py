"""The batch rule, in one place: global batch = micro-batch x gradient accumulation x data-parallel size.

The config check (world size 1), the preflight (the launch's world size), `launch/submit.py`
(nodes x tasks per node) and the loader all call `accumulation_steps`; nothing else derives it.
"""

from __future__ import annotations

from data.config import ConfigError


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Gradient accumulation steps of this layout; a layout that does not divide is refused with one that does."""
    if global_batch < 1 or micro_batch < 1 or world_size < 1:
        raise ConfigError(f"global_batch ({global_batch}), micro_batch ({micro_batch}) and the number of "
                          f"processes ({world_size}) must all be at least 1")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        nearest = max(per_step, round(global_batch / per_step) * per_step)
        processes = "" if world_size == 1 else f" x {world_size} processes"
        raise ConfigError(f"global_batch {global_batch} does not divide into micro_batch {micro_batch}{processes}: "
                          f"global_batch = micro_batch x accumulation{processes}; e.g. global_batch={nearest}, "
                          "or another micro_batch or process count")
    return global_batch // per_step
