"""Committed checkpoints: written under a temporary name, flushed to disk, renamed into place, then pointed to.

Layout under `<run>/checkpoints/`:

  step_00000100/            a committed checkpoint (DeepSpeed's files for one tag, plus ours)
    mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's (pickles: DeepSpeed loads them itself)
    rng/rank_00000.pt       each rank's RNG states: tensors and plain types (torch.load(weights_only=True))
    shorten_checkpoint.json step, data position, world size, fingerprints, versions and the list of every
                            file of the checkpoint with its size: readable without torch
  step_00000100.universal/  the same converted to DeepSpeed's universal format (world-size change)
  step_00000100.refused/    a committed checkpoint whose files no longer match their list, set aside
  latest                    the newest committed tag, replaced atomically (DeepSpeed's convention)
  .tmp-step_00000200/       being written; never loaded, removed at the next start

Saving: every rank writes its files under `.tmp-step_N` and fsyncs them; the ranks exchange the names
and sizes of what they wrote (a collective, so also a barrier); rank 0 writes the metadata with that
file list, fsyncs the directories, renames `.tmp-step_N` to `step_N`, fsyncs the parent, rewrites
`latest` (temporary file + fsync + rename) and deletes checkpoints that fell out of the retention
window; a barrier releases everyone. A job killed at any point, or a node that crashes, leaves either
the previous committed checkpoint or the new one, never a half one that is loaded. Resuming checks
the file list first (`CheckpointStore.resume_point`): a missing or truncated file refuses that
checkpoint, and the run resumes from the newest older one that is whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.artifacts import fsync_path, write_json_atomic, write_text_atomic
from training.distributed import all_gather_object, barrier, on_gpu
from training.run_dir import tag_for

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
METADATA = "shorten_checkpoint.json"
UNIVERSAL_SUFFIX = ".universal"
REFUSED_SUFFIX = ".refused"
# DeepSpeed converts a checkpoint to its universal format only when the client state says which
# version of the format the model follows.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class CheckpointError(RuntimeError):
    """A committed checkpoint cannot be used to resume."""


@dataclass(frozen=True)
class Committed:
    tag: str
    step: int
    path: Path

    def metadata(self) -> dict:
        return json.loads((self.path / METADATA).read_text())


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain types, so they load with torch.load(weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if on_gpu():  # not in CPU ranks on a GPU machine: no CUDA context for them
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state(state["cuda"])


def files_problem(checkpoint: Committed) -> str | None:
    """Why a committed checkpoint cannot be loaded as it is on disk (a file missing, or not of the size its
    commit recorded), or None. A checkpoint committed before file lists existed is taken as it is."""
    try:
        files = checkpoint.metadata().get("files")
    except (OSError, json.JSONDecodeError) as err:
        return f"its {METADATA} is unreadable ({err})"
    for name, size in (files or {}).items():
        path = checkpoint.path / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, its commit recorded {size:,}"
    return None


@contextlib.contextmanager
def recording_writes(engine) -> Iterator[list[Path]]:
    """The paths of the files DeepSpeed writes for a checkpoint on this rank (it writes every state file
    through `engine.checkpoint_engine.save`), so the rank can flush and list exactly its own files."""
    written: list[Path] = []
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        written.append(Path(path))
        return result

    checkpoint_engine.save = save
    try:
        yield written
    finally:
        del checkpoint_engine.save  # the class's method again


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

    def resume_point(self) -> tuple[Committed | None, list[tuple[Committed, str]]]:
        """The checkpoint to resume from: the one `latest` names if its files are whole, else the newest older
        one that is; and the refused ones with the reason."""
        latest = self.latest()
        refused = []
        for checkpoint in reversed([c for c in self.committed() if latest and c.step <= latest.step]):
            problem = files_problem(checkpoint)
            if problem is None:
                return checkpoint, refused
            refused.append((checkpoint, problem))
        return None, refused

    def set_aside_refused(self) -> list[str]:
        """Rank 0 renames checkpoints that `resume_point` refuses to `step_N.refused` (kept for inspection,
        out of the way of the step_N the resumed run will commit again)."""
        if self.rank != 0:
            return []
        _, refused = self.resume_point()
        notes = []
        for checkpoint, problem in refused:
            aside = checkpoint.path.with_name(checkpoint.tag + REFUSED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)  # an older refusal of the same step
            os.replace(checkpoint.path, aside)
            shutil.rmtree(checkpoint.path.with_name(checkpoint.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
            notes.append(f"{checkpoint.tag}: {problem}")
        return notes


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

    def save(self, engine, step: int, metadata: dict, exclude_frozen: bool = False) -> Path:
        """Collective: every rank calls it at the same step. Returns the committed path.
        `metadata` (plain types) goes to shorten_checkpoint.json; `exclude_frozen` leaves parameters
        without gradients (a LoRA run's base model) out."""
        tag = tag_for(step)
        final = self.directory / tag
        if final.is_dir():  # already committed at this step (e.g. a periodic save, then a stop)
            return final
        tmp = self.directory / (TMP_PREFIX + tag)
        with recording_writes(engine) as written:
            engine.save_checkpoint(str(self.directory), tag=tmp.name, client_state=UNIVERSAL_INFO,
                                   save_latest=False, exclude_frozen_parameters=exclude_frozen)
        rng = tmp / "rng" / f"rank_{self.rank:05d}.pt"
        rng.parent.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), rng)
        written.append(rng)
        for path in written:
            fsync_path(path)
        mine = {path.relative_to(tmp).as_posix(): path.stat().st_size for path in written}
        files = {name: size for rank_files in all_gather_object(mine) for name, size in rank_files.items()}
        if self.rank == 0:
            self.commit(tmp, final, {"tag": tag, "step": step, **metadata}, files)
        barrier()
        return final

    def commit(self, tmp: Path, final: Path, metadata: dict, files: dict[str, int]) -> None:
        """Rank 0, once every rank's files are on disk: record the file list, flush, rename, point to it."""
        for path in sorted(tmp.rglob("*")):  # files DeepSpeed copies in outside its checkpoint engine
            name = path.relative_to(tmp).as_posix()
            if path.is_file() and name not in files:
                fsync_path(path)
                files[name] = path.stat().st_size
        write_json_atomic(tmp / METADATA, {**metadata, "files": dict(sorted(files.items()))}, durable=True)
        for directory in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync_path(directory)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(self.directory)
        write_text_atomic(self.directory / "latest", final.name + "\n", durable=True)
        self.apply_retention()

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
                universal_lock(checkpoint).unlink(missing_ok=True)
                removed.append(checkpoint.step)
        return removed

    def rng_state(self, checkpoint: Committed) -> dict | None:
        path = checkpoint.path / "rng" / f"rank_{self.rank:05d}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None


def universal_lock(checkpoint: Committed) -> Path:
    return checkpoint.path.with_name(f".{checkpoint.tag}{UNIVERSAL_SUFFIX}.lock")


def ensure_universal(checkpoint: Committed, world_size: int) -> Path:
    """DeepSpeed's universal format of `checkpoint` (needed to resume on another data-parallel world size),
    converted once, before any process group exists.

    Every rank calls it; the first to take a lock file beside the checkpoint runs
    `python -m deepspeed.checkpoint.ds_to_universal` into a temporary directory and renames it to
    `<tag>.universal`, the others wait on the lock (no collective, so no timeout however long the
    conversion takes) and find it done. A conversion killed midway leaves only its temporary directory
    and releases the lock: the next attempt starts the conversion again and a finished one is reused.
    """
    target = checkpoint.path.with_name(checkpoint.tag + UNIVERSAL_SUFFIX)
    if target.is_dir():
        return target
    with open(universal_lock(checkpoint), "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # POSIX locks: honoured across nodes on NFS and Lustre (flock mount)
        if not target.is_dir():
            print(f"world size {checkpoint.metadata()['world_size']} -> {world_size}: "
                  f"converting {checkpoint.tag} to DeepSpeed's universal format", flush=True)
            convert_to_universal(checkpoint, target)
    return target


def convert_to_universal(checkpoint: Committed, target: Path) -> None:
    tmp = checkpoint.path.with_name(TMP_PREFIX + target.name)
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
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
