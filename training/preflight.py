"""The checks every training stage (CPT, LoRA) makes before any process group, model or optimizer exists.

`plan_training` is cheap (batch layout, device and precision, an attention implementation that can
mask documents, kernel options, the run directory's checkpoint metadata and file lists) and runs on
every rank before distributed start-up, so a bad batch layout, an attention kernel that would let
packed documents see each other, or a checkpoint from another run fails in seconds with one clear
message, identically on all ranks. Its one expensive step comes last, after every check: converting
the checkpoint to resume from to DeepSpeed's universal format when the world size changed (once,
under a file lock, no collective).
The stages add their own checks (`training/cpt.plan_cpt`, `training/lora.plan_lora`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data.artifacts import directory_fingerprint
from data.batch_layout import accumulation_steps
from data.config import ConfigError
from data.embedded import resolve_model
from data.model_code import check_trust_remote_code, model_code_files
from data.precision import resolve_device, resolve_precision
from data.shards import DataMismatchError
from training.attention import resolve_attention
from training.checkpoint import CheckpointStore, Committed, ensure_universal
from training.config import TrainingConfig
from training.distributed import WorldInfo, on_gpu
from training.kernels import check_kernels
from training.profiling import check_profile
from training.run_dir import RunDir
from training.schedule import check_extension
from training.tracking import check_trackers


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
    attention: str  # the resolved attn_implementation (training/attention.py)


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the model's tokenizer from {model_path!r} ({err.__class__.__name__}): "
                          "set model= to a Hugging Face checkpoint directory or hub name") from err


def checkpoint_store(config: TrainingConfig, rank: int) -> CheckpointStore:
    return CheckpointStore(RunDir(config.output_dir).checkpoints, rank, config.checkpoint.keep_last,
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
            then = then.get(part, now)  # a key newer than the checkpoint: it was trained before the setting existed
        if then != now:
            raise ConfigError(f"{where} was trained with {key}={then}, not {now}: keep it to resume exactly, "
                              "or use a new output_dir")


def check_model_path(model: str, trust_remote_code: bool) -> str:
    """The resolved model path; a local directory must be a Hugging Face checkpoint, and one with its own
    modeling code (module-pruned) needs `trust_remote_code`."""
    model_path = resolve_model(model)
    local = Path(model_path)
    if (local.is_absolute() or model_path.startswith(".") or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"model {model_path} is not a Hugging Face checkpoint directory (no config.json): "
                          "set model= to a checkpoint written by launch/prune.py, launch/cpt.py or transformers "
                          "(launch/eval.py also takes <run>/checkpoints/step_N)")
    check_trust_remote_code(model_path, trust_remote_code)
    return model_path


def model_fingerprint(model_path: str) -> str:
    """Config, tokenizer and pruning report: cheap, and enough to tell two models apart."""
    local = Path(model_path)
    return directory_fingerprint(local, ("*.json",)) if local.is_dir() else model_path


def check_output_dir(output_dir: Path) -> None:
    """The run directory must be a directory (or not exist yet), writable by this process."""
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir}: {existing} is a file, not a directory; choose another output_dir")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir}: {existing} is not writable by this user; choose another "
                          "output_dir")


def plan_training(config: TrainingConfig, world: WorldInfo, model_path: str, fingerprints: dict,
                  total_steps: int, seq_len: int, invariants: dict) -> RunPlan:
    """The checks and derived values every training stage shares: batch layout, device, resumption."""
    accumulation = accumulation_steps(config.global_batch, config.micro_batch, world.world_size)
    device = resolve_device() if on_gpu() else torch.device("cpu")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                              "visible on this node): start one process per GPU (deepspeed --num_gpus, torchrun "
                              "--nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU")
        device = torch.device("cuda", world.local_rank)
    precision = resolve_precision(config.precision, device)
    attention = resolve_attention(config.attn_implementation, device, precision)
    if config.kernels == "liger" and model_code_files(model_path):
        raise ConfigError("kernels=liger patches every layer's MLP and norms, and this module-pruned model lacks some "
                          "of them: set kernels=none")
    check_kernels(config.kernels, device, config.zero_stage)
    check_trackers(config.logging)
    check_profile(config.profile, device, total_steps, world.world_size)
    check_output_dir(Path(config.output_dir))
    store = checkpoint_store(config, world.rank)
    resume_from, refused = store.resume_point()
    if world.rank == 0:
        for checkpoint, problem in refused:
            print(f"checkpoint {checkpoint.path} is not whole ({problem}): resuming from an older one")
    needs_universal = False
    if store.latest() is not None and not config.resume:
        raise ConfigError(f"{config.output_dir} already holds checkpoints (latest {store.latest().tag}); set "
                          "resume=true to continue it, or choose a new output_dir")
    if resume_from is not None:
        check_resume(config, resume_from, fingerprints, invariants)
        check_extension(resume_from.metadata().get("schedule"), resume_from.step, total_steps, config.schedule,
                        f"the checkpoint {resume_from.path}")
        needs_universal = resume_from.metadata()["world_size"] != world.world_size
        if needs_universal:  # before any process group: no collective waits on this, however long it takes
            ensure_universal(resume_from, world.world_size)
    return RunPlan(world, model_path, accumulation, total_steps, seq_len, precision, device, fingerprints,
                   resume_from, needs_universal, attention)

