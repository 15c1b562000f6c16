"""The last step each tracked run has received, across the launches of one run directory.

A launch that resumes from the checkpoint at step c trains steps c+1.. again, and a tracked run that
it continues (W&B, MLflow: same run id, from the checkpoint) may already hold some of them from the
launch that died. W&B takes only increasing steps (online it drops lower ones with a warning; offline
runs would be appended twice by `wandb sync`) and MLflow would keep two values for one step, so those
steps are not sent again: a tracked run keeps the first value it got for a step. With the same number
of ranks a resume is exact and the values are the same as metrics.jsonl's; after a world-size change
they differ in the last bits.

Known without a write per step: rank 0 appends each step to metrics.jsonl before any tracker gets it,
so the largest step in metrics.jsonl, read before it is cut back to the checkpoint, bounds what the
previous launch sent. `<output_dir>/trackers.json` records which tracked runs each launch feeds
(`active`) and the last step each tracked run was fed (`through`), so the bound survives a second
resume from the same early checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.artifacts import write_json_atomic


class StepLedger:
    def __init__(self, path: Path, previous_last_step: int | None):
        """`previous_last_step`: the largest step in metrics.jsonl before this launch cut it back (None: none)."""
        self.path = path
        try:
            saved = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            saved = {}  # a damaged ledger: at worst a step is sent twice, metrics.jsonl is unaffected
        self.through: dict[str, int] = dict(saved.get("through", {}))
        if previous_last_step is not None:
            for key in saved.get("active", []):
                self.through[key] = max(self.through.get(key, -1), previous_last_step)

    def last_step(self, run_key: str | None) -> int:
        """Steps up to this one are not sent to the tracked run `run_key` again (-1: send everything)."""
        return self.through.get(run_key, -1) if run_key else -1

    def begin(self, run_keys: list[str]) -> None:
        """Record the tracked runs this launch feeds, before it sends them anything."""
        if run_keys or self.through or self.path.exists():
            write_json_atomic(self.path, {"active": sorted(run_keys), "through": self.through})
