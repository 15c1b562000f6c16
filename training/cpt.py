"""Continued pretraining: its plan and its parts, on the shared DeepSpeed trainer.

  plan_cpt(config, world) -> CPTPlan               cheap checks, before any process group exists
  build_cpt_trainer(config, plan, should_stop)     pruned model, packed token data (natural or a mixture
                                                   over source sets), held-out loss overall and per set,
                                                   the dynamic mixture, zero-shot, Hugging Face export
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from transformers import AutoConfig

from data.config import ConfigError, to_dict
from data.embedded import resolve_tasks
from data.lineage import copy_lineage
from data.loader import GlobalBatchLoader, collate
from data.model_code import copy_model_code
from data.packed import PackedSequences
from data.precision import torch_dtype
from data.shards import DataMismatchError, Manifest
from data.varlen import varlen_collate
from training.attention import uses_flat_batches
from training.config import CPTConfig
from training.distill import DistillLoss, load_teacher
from training.distributed import WorldInfo
from training.evaluation.zeroshot import ZeroShotEvaluation, load_tasks
from training.export import export_from_engine
from training.mixture import DynamicMixture, MixturePlan, measure_reference, plan_mixture, stored_reference
from training.preflight import RunPlan, check_model_path, load_tokenizer, model_fingerprint, plan_training
from training.run_dir import RunDir
from training.trainer import PeriodicEvaluation, Trainer, causal_lm_loss, load_model, prepare_run_dir
from training.validation import SetLosses, ValidationLoss


@dataclass
class CPTPlan(RunPlan):
    zeroshot_tasks: dict | None = None  # lm-eval task objects, data loaded before launch
    mixture: MixturePlan | None = None  # None: the natural order


def plan_cpt(config: CPTConfig, world: WorldInfo) -> CPTPlan:
    """The shared checks, plus the token data (tokenizer, size, validation split) and the zero-shot tasks."""
    model_path = check_model_path(config.model, config.trust_remote_code)
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
        sets = held_out_by_set(config)
        few = sorted(name for name, items in (sets.set_ranges if sets else {}).items()
                     if min(len(items), config.validation.per_set()) < world.world_size)
        if config.validation.per_set() and few and world.rank == 0:
            print(f"val.loss.<set> leaves out {', '.join(few)}: fewer held-out sequences of {config.data.seq_len} "
                  f"tokens than ranks ({world.world_size})")
    zeroshot_tasks = None
    if config.zeroshot.every_steps:  # datasets load now: a task unavailable offline fails before launch
        include = resolve_tasks(config.zeroshot.include_path) if config.zeroshot.include_path else None
        zeroshot_tasks = load_tasks(config.zeroshot.tasks, Path(include) if include else None)
    mixture = plan_mixture(config, world, tokenizer, config.total_steps())
    if mixture is not None and world.rank == 0:
        print("\n".join(mixture.notes))
    fingerprints = {"data": manifest.fingerprint, "model": model_fingerprint(model_path)}
    invariants = {"global_batch": config.global_batch, "data.seq_len": config.data.seq_len, "init": config.init,
                  "data.mixture": config.data.mixture}
    if config.data.mixture == "dynamic":
        invariants["data.dynamic"] = to_dict(config.data.dynamic)
    fingerprints["teacher"] = None  # a distilled run resumed without its teacher is refused like another teacher
    if config.distill.teacher:
        teacher_path = check_teacher(config.distill.teacher, tokenizer, config.distill.top_k, config.trust_remote_code)
        fingerprints["teacher"] = model_fingerprint(teacher_path)
        invariants.update({"distill.alpha": config.distill.alpha, "distill.temperature": config.distill.temperature,
                           "distill.top_k": config.distill.top_k})
    plan = plan_training(config, world, model_path, fingerprints, config.total_steps(), config.data.seq_len, invariants)
    if plan.device.type == "cuda" and config.memory_check:
        check_memory(config, plan, teacher_path if config.distill.teacher else None)
    return CPTPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)}, zeroshot_tasks=zeroshot_tasks,
                   mixture=mixture)


def check_memory(config: CPTConfig, plan: RunPlan, teacher_path: str | None) -> None:
    """Refuse a run whose per-GPU memory estimate exceeds this GPU's memory, naming what to change."""
    import torch

    from training.memory import ModelShape, refusal, setup_for

    def shape(path: str) -> ModelShape:
        trust = config.trust_remote_code
        return ModelShape.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust), trust)

    setup = setup_for(config, plan.world.world_size, plan.precision, plan.attention,
                      shape(teacher_path) if teacher_path else None)
    problem = refusal(shape(plan.model_path), setup,
                      torch.cuda.get_device_name(plan.device), torch.cuda.get_device_properties(plan.device).total_memory)
    if problem is not None:
        raise ConfigError(problem)


def check_teacher(teacher: str, student_tokenizer, top_k: int | None, trust_remote_code: bool) -> str:
    """The teacher's path; refused unless it reads text with exactly the student's tokenizer and has at least
    top_k logits."""
    path = check_model_path(teacher, trust_remote_code)
    if load_tokenizer(path).get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"distill.teacher {teacher} has another tokenizer than the student: distillation "
                          "compares logits token by token, so use the model the student was pruned from")
    vocab = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config().vocab_size
    if top_k is not None and top_k > vocab:
        raise ConfigError(f"distill.top_k={top_k} is more than the teacher's {vocab} logits: lower it (Model-Optimizer"
                          "'s default is 1024), or set distill.top_k=null for the full vocabulary")
    return path


def build_cpt_trainer(config: CPTConfig, plan: CPTPlan, should_stop: Callable[[], bool]) -> Trainer:
    """Continued pretraining's parts: the pruned model, packed token data, held-out loss, zero-shot,
    and a Hugging Face export of the final weights."""
    rank = plan.world.rank
    tokenizer = load_tokenizer(plan.model_path)

    def template(directory: Path) -> None:  # config, modeling code, tokenizer: what an export of any checkpoint needs
        AutoConfig.from_pretrained(plan.model_path).save_pretrained(directory)
        copy_model_code(plan.model_path, directory)
        tokenizer.save_pretrained(directory)
        copy_lineage(plan.model_path, directory)  # a pruned model's original block numbers, for its exports

    prepare_run_dir(config, rank, template)
    data, validation, mixture = config.data, config.validation, plan.mixture
    batches = varlen_collate if uses_flat_batches(plan.attention) else collate  # boundaries for varlen kernels
    held_out_sets = held_out_by_set(config) if validation.every_steps or data.mixture == "dynamic" else None
    per_set = SetLosses(held_out_sets, validation.per_set(), config.micro_batch, plan.world, batches) \
        if held_out_sets is not None and validation.per_set() else None
    reference = mixture_reference(config, plan, per_set) if data.mixture == "dynamic" else None  # before the model
    model = load_model(config, plan, random_init=config.init == "random")
    train = PackedSequences(data.path, data.seq_len, "train", data.document_masking, by_set=mixture is not None)
    loader = GlobalBatchLoader(train, config.global_batch, config.micro_batch, plan.world.world_size, rank, data.seed,
                               data.num_workers, collate_fn=batches, mixture=mixture.weights if mixture else None,
                               on_exhausted=data.on_exhausted)
    evaluations: list[PeriodicEvaluation] = []
    if validation.every_steps and validation.sequences:
        held_out = PackedSequences(data.path, data.seq_len, "validation", data.document_masking)
        evaluations.append(ValidationLoss(held_out, validation.sequences, config.micro_batch, plan.world,
                                          validation.every_steps, batches, per_set))
    if reference is not None:
        dynamic = data.dynamic
        evaluations.append(DynamicMixture(per_set, loader, reference, dynamic.update_every, dynamic.eta,
                                          dynamic.smoothing, dynamic.clip_gaps))
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
        teacher = load_teacher(config, plan, check_model_path(distill.teacher, config.trust_remote_code))
        loss = DistillLoss(teacher, distill.alpha, distill.temperature, distill.chunk, distill.top_k)
    return Trainer(config, plan, model, loader, should_stop, evaluations, export, loss)


def held_out_by_set(config: CPTConfig) -> PackedSequences | None:
    """The validation split's sequences by source set; None without a split or with no set long enough."""
    if "validation" not in Manifest.load(config.data.path).data["splits"]:
        return None
    try:
        return PackedSequences(config.data.path, config.data.seq_len, "validation", config.data.document_masking,
                               by_set=True)
    except DataMismatchError:
        return None


def mixture_reference(config: CPTConfig, plan: CPTPlan, held_out: SetLosses) -> dict[str, float]:
    """The dynamic mixture's reference loss per set: the config's, the one an earlier start of this run
    measured, or the unpruned model's held-out loss measured now (all ranks together, before the student is
    loaded, so the two never share a device)."""
    if config.data.dynamic.reference:
        return dict(config.data.dynamic.reference)
    path = plan.mixture.reference_model
    identity = {"model": path, "model_fingerprint": model_fingerprint(path), "data": plan.fingerprints["data"],
                "seq_len": config.data.seq_len, "sequences": config.validation.per_set(), "sets": held_out.sets}
    run_dir = Path(config.output_dir)
    stored = stored_reference(run_dir, identity)
    if stored is not None:
        return stored
    started = time.perf_counter()
    reference_model = load_teacher(config, plan, path)
    losses = measure_reference(reference_model, held_out, run_dir, identity, plan.world.rank)
    del reference_model
    if plan.world.rank == 0:
        print(f"reference loss per set, {path} on the held-out sequences ({time.perf_counter() - started:.0f} s): "
              + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()))
    return losses
