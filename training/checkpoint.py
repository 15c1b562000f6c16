"""Committed checkpoints: written under a temporary name, renamed into place, then pointed to.

Layout under `<run>/checkpoints/`:

  step_00000100/            a committed checkpoint (DeepSpeed's files for one tag, plus ours)
    mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed (client state inside: ours)
    rng/rank_00000.pt       each rank's RNG states
    shorten_checkpoint.json step, world size, fingerprints, versions: readable without torch
  step_00000100.universal/  the same converted to DeepSpeed's universal format (world-size change)
  latest                    the newest committed tag, replaced atomically (DeepSpeed's convention)
  .tmp-step_00000200/       being written; never loaded, removed at the next start

Saving: every rank writes under `.tmp-step_N`, all ranks meet at a barrier, rank 0 renames the
directory to `step_N`, rewrites `latest` (temporary file + rename) and deletes checkpoints that
fell out of the retention window; a second barrier releases everyone. A job killed at any point
leaves either the previous committed checkpoint or the new one, never a half one that is loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.artifacts import write_json_atomic
from training.distributed import barrier

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
METADATA = "shorten_checkpoint.json"
UNIVERSAL_SUFFIX = ".universal"
# DeepSpeed converts a checkpoint to its universal format only when the client state says which
# version of the format the model follows.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class CheckpointError(RuntimeError):
    """A committed checkpoint cannot be used to resume."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Committed:
    tag: str
    step: int
    path: Path

    def metadata(self) -> dict:
        return json.loads((self.path / METADATA).read_text())


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointStore:
    def __init__(self, directory: Path, rank: int, keep_last: int, permanent_every: int,
                 keep_best: str | None = None):
        self.directory, self.rank = Path(directory), rank
        self.keep_last, self.permanent_every, self.keep_best = keep_last, permanent_every, keep_best

    def committed(self) -> list[Committed]:
        """Committed checkpoints, oldest first (a directory named step_N exists only once complete)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = TAG_PATTERN.match(path.name)
            if match and path.is_dir() and (path / METADATA).is_file():
                found.append(Committed(path.name, int(match.group(1)), path))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Committed | None:
        """The checkpoint `latest` names; the newest committed one if the pointer is missing or stale."""
        committed = self.committed()
        pointer = self.directory / "latest"
        if pointer.is_file():
            named = pointer.read_text().strip()
            for checkpoint in committed:
                if checkpoint.tag == named:
                    return checkpoint
        return committed[-1] if committed else None

    def best(self, metric: str) -> Committed | None:
        """The committed checkpoint with the lowest `metric` recorded at its step (earliest on ties)."""
        scored = [(c.metadata().get("evaluation", {}).get(metric), c) for c in self.committed()]
        scored = [(value, c) for value, c in scored if value is not None]
        return min(scored, key=lambda vc: (vc[0], vc[1].step))[1] if scored else None

    def clean_partial(self) -> list[str]:
        """Rank 0 removes checkpoints that were being written when an earlier run died."""
        if self.rank != 0 or not self.directory.is_dir():
            return []
        partial = [p for p in self.directory.iterdir() if p.name.startswith(TMP_PREFIX)]
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in partial]

    def save(self, engine, step: int, client_state: dict, metadata: dict, exclude_frozen: bool = False) -> Path:
        """Collective: every rank calls it at the same step. Returns the committed path.
        `exclude_frozen` leaves parameters without gradients (a LoRA run's base model) out."""
        tag = tag_for(step)
        final = self.directory / tag
        if final.is_dir():  # already committed at this step (e.g. a periodic save, then a stop)
            return final
        tmp_tag = TMP_PREFIX + tag
        engine.save_checkpoint(str(self.directory), tag=tmp_tag, client_state={**client_state, **UNIVERSAL_INFO},
                               save_latest=False, exclude_frozen_parameters=exclude_frozen)
        rng_dir = self.directory / tmp_tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), rng_dir / f"rank_{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            write_json_atomic(self.directory / tmp_tag / METADATA, {"tag": tag, "step": step, **metadata})
            os.replace(self.directory / tmp_tag, final)
            (self.directory / ".latest.tmp").write_text(tag + "\n")
            os.replace(self.directory / ".latest.tmp", self.directory / "latest")
            self.apply_retention()
        barrier()
        return final

    def apply_retention(self) -> list[int]:
        """Keep the newest `keep_last`, every multiple of `permanent_every` and the best by `keep_best`;
        delete the rest."""
        committed = self.committed()
        recent = {c.step for c in committed[-self.keep_last:]}
        best = self.best(self.keep_best) if self.keep_best else None
        if best is not None:
            recent.add(best.step)
        removed = []
        for checkpoint in committed:
            permanent = self.permanent_every and checkpoint.step % self.permanent_every == 0
            if checkpoint.step not in recent and not permanent:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                shutil.rmtree(checkpoint.path.with_name(checkpoint.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
                removed.append(checkpoint.step)
        return removed

    def rng_state(self, checkpoint: Committed) -> dict | None:
        path = checkpoint.path / "rng" / f"rank_{self.rank:05d}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None


def convert_to_universal(checkpoint: Committed) -> Path:
    """DeepSpeed's universal format, needed to resume on another data-parallel world size.

    Runs `python -m deepspeed.checkpoint.ds_to_universal` into a temporary directory and renames
    it to `<tag>.universal` beside the checkpoint; an existing conversion is reused.
    """
    target = checkpoint.path.with_name(checkpoint.tag + UNIVERSAL_SUFFIX)
    if target.is_dir():
        return target
    tmp = checkpoint.path.with_name(TMP_PREFIX + checkpoint.tag + UNIVERSAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    workers = min(4, os.cpu_count() or 1)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(checkpoint.path), "--output_folder", str(tmp), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {checkpoint.path} to DeepSpeed's universal format failed:\n"
                              f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    shutil.copy2(checkpoint.path / METADATA, tmp / METADATA)
    os.replace(tmp, target)
    return target
