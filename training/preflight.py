"""Everything about a run that can be checked before any process group, model or optimizer exists.

`plan_run` is cheap (reads the model's config and tokenizer, the data manifest and the run
directory's checkpoint metadata) and runs on every rank before distributed start-up, so a bad
batch layout, missing data, a tokenizer mismatch or a checkpoint from another run fails in seconds
with one clear message, identically on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data.artifacts import directory_fingerprint
from data.config import ConfigError
from data.embedded import resolve_model, resolve_tasks
from data.packed import PackedSequences, check_batch_layout
from data.shards import DataMismatchError, Manifest
from training.checkpoint import CheckpointStore, Committed
from training.config import CPTConfig, TrainingConfig
from training.distributed import WorldInfo
from training.zeroshot import load_tasks


@dataclass
class RunPlan:
    world: WorldInfo
    model_path: str
    accumulation: int
    total_steps: int
    seq_len: int
    precision: str
    device: torch.device
    fingerprints: dict[str, str | None]
    resume_from: Committed | None
    needs_universal: bool
    zeroshot_tasks: dict | None = None


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the model's tokenizer from {model_path!r} ({err.__class__.__name__}): "
                          "set model= to a Hugging Face checkpoint directory or hub name") from err


def checkpoint_store(config: TrainingConfig, rank: int) -> CheckpointStore:
    return CheckpointStore(config.output_dir / "checkpoints", rank, config.checkpoint.keep_last,
                           config.checkpoint.permanent_every, config.checkpoint.keep_best)


def check_resume(config: TrainingConfig, checkpoint: Committed, fingerprints: dict, invariants: dict) -> None:
    """Refuse a checkpoint whose inputs (fingerprints) or invariants (dotted config keys) differ."""
    saved = checkpoint.metadata()
    where = f"the checkpoint {checkpoint.path}"
    for name, now in fingerprints.items():
        if saved["fingerprints"].get(name) != now:
            raise DataMismatchError(f"{where} was trained from another {name} than this config names: set "
                                    f"the {name} the run started with, or use a new output_dir")
    for key, now in invariants.items():
        then = saved["config"]
        for part in key.split("."):
            then = then[part]
        if then != now:
            raise ConfigError(f"{where} was trained with {key}={then}, not {now}: keep it to resume exactly, "
                              "or use a new output_dir")


def check_model_path(model: str) -> str:
    """The resolved model path; a local directory must be a Hugging Face checkpoint."""
    model_path = resolve_model(model)
    local = Path(model_path)
    if (local.is_absolute() or model_path.startswith(".") or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"model {model_path} is not a Hugging Face checkpoint directory (no config.json): "
                          "set model= to a checkpoint written by launch/prune.py, launch/cpt.py or transformers "
                          "(launch/eval.py also takes <run>/checkpoints/step_N)")
    return model_path


def model_fingerprint(model_path: str) -> str:
    """Config, tokenizer and pruning report: cheap, and enough to tell two models apart."""
    local = Path(model_path)
    return directory_fingerprint(local, ("*.json",)) if local.is_dir() else model_path


def plan_training(config: TrainingConfig, world: WorldInfo, model_path: str, fingerprints: dict,
                  total_steps: int, seq_len: int, invariants: dict) -> RunPlan:
    """The checks and derived values every training stage shares: batch layout, device, resumption."""
    try:
        accumulation = check_batch_layout(config.global_batch, config.micro_batch, world.world_size, 0)
    except ValueError as err:
        raise ConfigError(f"{err}: choose global_batch = micro_batch x accumulation x {world.world_size} "
                          f"processes (e.g. global_batch={config.micro_batch * world.world_size * 4})") from err
    on_gpu = torch.cuda.is_available()
    precision = config.precision if config.precision != "auto" else ("bf16" if on_gpu else "fp32")
    device = torch.device("cuda", world.local_rank) if on_gpu else torch.device("cpu")
    resume_from = checkpoint_store(config, world.rank).latest()
    needs_universal = False
    if resume_from is not None:
        if not config.resume:
            raise ConfigError(f"{config.output_dir} already holds checkpoints (latest {resume_from.tag}); set "
                              "resume=true to continue it, or choose a new output_dir")
        check_resume(config, resume_from, fingerprints, invariants)
        needs_universal = resume_from.metadata()["world_size"] != world.world_size
    return RunPlan(world, model_path, accumulation, total_steps, seq_len, precision, device, fingerprints,
                   resume_from, needs_universal)


def plan_run(config: CPTConfig, world: WorldInfo) -> RunPlan:
    """Continued pretraining: the shared checks, plus the token data and the periodic evaluations."""
    model_path = check_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    manifest = Manifest.load(config.data.path)
    manifest.check_tokenizer(tokenizer)
    PackedSequences(config.data.path, config.data.seq_len, "train")  # at least one sequence
    if config.validation.every_steps and config.validation.sequences:
        if "validation" not in manifest.data["splits"]:
            raise ConfigError(f"{config.data.path} has no validation split: prepare the data with "
                              "validation_fraction > 0, or set validation.every_steps=0")
        held_out = PackedSequences(config.data.path, config.data.seq_len, "validation")
        if min(len(held_out), config.validation.sequences) < world.world_size:
            raise ConfigError(f"validation needs at least one sequence per rank ({world.world_size}), the split "
                              f"has {len(held_out)}: set validation.sequences higher or validation.every_steps=0")
    zeroshot_tasks = None
    if config.zeroshot.every_steps:  # datasets load now: a task unavailable offline fails before launch
        include = resolve_tasks(config.zeroshot.include_path) if config.zeroshot.include_path else None
        zeroshot_tasks = load_tasks(config.zeroshot.tasks, Path(include) if include else None)
    plan = plan_training(config, world, model_path, {"data": manifest.fingerprint, "model": model_fingerprint(model_path)},
                         config.total_steps(), config.data.seq_len,
                         {"global_batch": config.global_batch, "data.seq_len": config.data.seq_len})
    plan.zeroshot_tasks = zeroshot_tasks
    return plan
