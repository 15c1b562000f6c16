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
from training.config import CPTConfig
from training.distributed import WorldInfo
from training.zeroshot import load_tasks


@dataclass
class RunPlan:
    world: WorldInfo
    model_path: str
    accumulation: int
    total_steps: int
    tokens_per_step: int
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


def checkpoint_store(config: CPTConfig, rank: int) -> CheckpointStore:
    return CheckpointStore(config.output_dir / "checkpoints", rank, config.checkpoint.keep_last,
                           config.checkpoint.permanent_every)


def check_resume(config: CPTConfig, checkpoint: Committed, fingerprints: dict) -> None:
    """Refuse a checkpoint whose data, model, batch or sequence length differ from this config."""
    saved = checkpoint.metadata()
    where = f"the checkpoint {checkpoint.path}"
    if saved["fingerprints"].get("data") != fingerprints["data"]:
        raise DataMismatchError(f"{where} was trained on other token data than {config.data.path}: point "
                                "data.path at the run's data, or use a new output_dir")
    if saved["fingerprints"].get("model") != fingerprints["model"]:
        raise ConfigError(f"{where} started from another model than {config.model}: resume with model= set "
                          "as the run started, or use a new output_dir")
    before = (saved["config"]["global_batch"], saved["config"]["data"]["seq_len"])
    for key, then, now in zip(("global_batch", "data.seq_len"), before, (config.global_batch, config.data.seq_len),
                              strict=True):
        if then != now:
            raise ConfigError(f"{where} was trained with {key}={then}, not {now}: keep it to resume exactly, "
                              "or use a new output_dir")


def plan_run(config: CPTConfig, world: WorldInfo) -> RunPlan:
    try:
        accumulation = check_batch_layout(config.global_batch, config.micro_batch, world.world_size, 0)
    except ValueError as err:
        raise ConfigError(f"{err}: choose global_batch = micro_batch x accumulation x {world.world_size} "
                          f"processes (e.g. global_batch={config.micro_batch * world.world_size * 4})") from err
    model_path = resolve_model(config.model)
    local = Path(model_path)
    if (local.is_absolute() or model_path.startswith(".") or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"model {model_path} is not a Hugging Face checkpoint directory (no config.json): "
                          "set model= to the pruned checkpoint from launch/prune.py")
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
    fingerprints = {"data": manifest.fingerprint,
                    "model": directory_fingerprint(local, ("*.json",)) if local.is_dir() else model_path}
    on_gpu = torch.cuda.is_available()
    precision = config.precision if config.precision != "auto" else ("bf16" if on_gpu else "fp32")
    device = torch.device("cuda", world.local_rank) if on_gpu else torch.device("cpu")

    store = checkpoint_store(config, world.rank)
    resume_from = store.latest()
    needs_universal = False
    if resume_from is not None:
        if not config.resume:
            raise ConfigError(f"{config.output_dir} already holds checkpoints (latest {resume_from.tag}); set "
                              "resume=true to continue it, or choose a new output_dir")
        check_resume(config, resume_from, fingerprints)
        needs_universal = resume_from.metadata()["world_size"] != world.world_size
    return RunPlan(world, model_path, accumulation, config.total_steps(), config.global_batch * config.data.seq_len,
                   precision, device, fingerprints, resume_from, needs_universal, zeroshot_tasks)
