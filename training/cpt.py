"""Continued pretraining: its plan and its parts, on the shared DeepSpeed trainer.

  plan_cpt(config, world) -> CPTPlan               cheap checks, before any process group exists
  build_cpt_trainer(config, plan, should_stop)     pruned model, packed token data, held-out loss,
                                                   zero-shot, Hugging Face export of the final weights
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from transformers import AutoConfig

from data.config import ConfigError
from data.embedded import resolve_tasks
from data.lineage import copy_lineage
from data.loader import GlobalBatchLoader, collate
from data.packed import PackedSequences
from data.precision import torch_dtype
from data.shards import Manifest
from data.varlen import varlen_collate
from training.attention import uses_flat_batches
from training.config import CPTConfig
from training.distill import DistillLoss, load_teacher
from training.distributed import WorldInfo
from training.export import export_from_engine
from training.preflight import RunPlan, check_model_path, load_tokenizer, model_fingerprint, plan_training
from training.run_dir import RunDir
from training.trainer import PeriodicEvaluation, Trainer, causal_lm_loss, load_model, prepare_run_dir
from training.validation import ValidationLoss
from training.zeroshot import ZeroShotEvaluation, load_tasks


@dataclass
class CPTPlan(RunPlan):
    zeroshot_tasks: dict | None = None  # lm-eval task objects, data loaded before launch


def plan_cpt(config: CPTConfig, world: WorldInfo) -> CPTPlan:
    """The shared checks, plus the token data (tokenizer, size, validation split) and the zero-shot tasks."""
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
    fingerprints = {"data": manifest.fingerprint, "model": model_fingerprint(model_path)}
    invariants = {"global_batch": config.global_batch, "data.seq_len": config.data.seq_len}
    if config.distill.teacher:
        teacher_path = check_teacher(config.distill.teacher, tokenizer, config.distill.top_k)
        fingerprints["teacher"] = model_fingerprint(teacher_path)
        invariants.update({"distill.alpha": config.distill.alpha, "distill.temperature": config.distill.temperature,
                           "distill.top_k": config.distill.top_k})
    plan = plan_training(config, world, model_path, fingerprints, config.total_steps(), config.data.seq_len, invariants)
    return CPTPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)}, zeroshot_tasks=zeroshot_tasks)


def check_teacher(teacher: str, student_tokenizer, top_k: int | None) -> str:
    """The teacher's path; refused unless it reads text with exactly the student's tokenizer and has at least
    top_k logits."""
    path = check_model_path(teacher)
    if load_tokenizer(path).get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"distill.teacher {teacher} has another tokenizer than the student: distillation "
                          "compares logits token by token, so use the model the student was pruned from")
    vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
    if top_k is not None and top_k > vocab:
        raise ConfigError(f"distill.top_k={top_k} is more than the teacher's {vocab} logits: lower it (Model-Optimizer"
                          "'s default is 1024), or set distill.top_k=null for the full vocabulary")
    return path


def build_cpt_trainer(config: CPTConfig, plan: CPTPlan, should_stop: Callable[[], bool]) -> Trainer:
    """Continued pretraining's parts: the pruned model, packed token data, held-out loss, zero-shot,
    and a Hugging Face export of the final weights."""
    rank = plan.world.rank
    tokenizer = load_tokenizer(plan.model_path)

    def template(directory: Path) -> None:  # config + tokenizer: what an export of any checkpoint needs
        AutoConfig.from_pretrained(plan.model_path).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        copy_lineage(plan.model_path, directory)  # a pruned model's original block numbers, for its exports

    prepare_run_dir(config, rank, template)
    model = load_model(config, plan)
    data = config.data
    batches = varlen_collate if uses_flat_batches(plan.attention) else collate  # boundaries for varlen kernels
    loader = GlobalBatchLoader(PackedSequences(data.path, data.seq_len, "train", data.document_masking),
                               config.global_batch, config.micro_batch, plan.world.world_size, rank, data.seed,
                               data.num_workers, collate_fn=batches)
    evaluations: list[PeriodicEvaluation] = []
    if config.validation.every_steps and config.validation.sequences:
        held_out = PackedSequences(data.path, data.seq_len, "validation", data.document_masking)
        evaluations.append(ValidationLoss(held_out, config.validation.sequences, config.micro_batch, plan.world,
                                          config.validation.every_steps, batches))
    if plan.zeroshot_tasks is not None:
        zeroshot = config.zeroshot
        evaluations.append(ZeroShotEvaluation(plan.zeroshot_tasks, zeroshot.tasks, tokenizer, zeroshot.every_steps,
                                              zeroshot.batch_size, data.seq_len, zeroshot.limit,
                                              zeroshot.add_bos_token))

    def export(trainer: Trainer) -> Path:
        info = {"step": trainer.step, "tokens": trainer.tokens, "fingerprints": plan.fingerprints,
                "source_run": str(config.output_dir)}
        run = RunDir(config.output_dir)
        return export_from_engine(trainer.engine, config.zero_stage, rank, tokenizer, run.export(trainer.step),
                                  torch_dtype(plan.precision), info, run.template)

    loss = causal_lm_loss
    if config.distill.teacher:
        distill = config.distill
        loss = DistillLoss(load_teacher(config, plan, check_model_path(distill.teacher)), distill.alpha,
                           distill.temperature, distill.chunk, distill.top_k)
    return Trainer(config, plan, model, loader, should_stop, evaluations, export, loss)
