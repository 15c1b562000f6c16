"""Weights & Biases, online or offline (files under <output_dir>/wandb/, uploaded later by `wandb sync`).

The run id is generated here the first time and saved in every checkpoint (`state()`), so a resumed
or requeued job opens the same W&B run (`resume="allow"`). Offline, each launch writes its own
`offline-run-*-<id>` directory; `wandb sync <output_dir>/wandb` uploads them into that one run in
order of start time. W&B accepts only increasing steps (online it drops lower ones with a warning;
offline nothing checks, and sync would append them twice), so steps a launch trains again after a
resume from an earlier checkpoint are not sent again (`training/tracking/ledger.py`).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from data.config import ConfigError
from training.config import WandbSection
from training.tracking.base import TrackedRun

EXIT_CODES = {"completed": 0, "preempted": 75, "diverged": 3}  # launch/cpt.py's


def resolved_mode(settings: WandbSection) -> str:
    return settings.mode or os.environ.get("WANDB_MODE") or "online"


def check(settings: WandbSection) -> None:
    """Online mode needs credentials; ask W&B itself (no prompt, no network) before anything is launched."""
    if resolved_mode(settings) != "online":
        return
    import wandb

    if not wandb.login(verify=False, prompt=False):
        raise ConfigError("logging.trackers has wandb in online mode and no W&B credentials were found: run "
                          "`wandb login` or set WANDB_API_KEY, or log offline with logging.wandb.mode=offline and "
                          "upload later with `wandb sync <output_dir>/wandb`")


class WandbTracker:
    name = "wandb"

    def __init__(self, tracked: TrackedRun, settings: WandbSection):
        import wandb

        run_id = tracked.saved.get("id") or secrets.token_hex(6)  # W&B ids: [a-z0-9], unique per project
        self.run = wandb.init(project=settings.project, entity=settings.entity,
                              name=settings.name or tracked.run.root.name, group=settings.group,
                              tags=settings.tags or None, id=run_id, resume="allow", mode=resolved_mode(settings),
                              dir=str(tracked.run.root), config=tracked.config, allow_val_change=True)
        self.run_key = f"wandb:{run_id}"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def finish(self, outcome: str) -> None:
        if outcome == "preempted":
            self.run.mark_preempting()  # shown as preempted, not crashed; the requeued job resumes it
        self.run.finish(exit_code=EXIT_CODES.get(outcome, 1))
