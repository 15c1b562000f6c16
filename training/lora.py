"""LoRA on Alpaca after pruning or continued pretraining, on the same Trainer as CPT.

  plan_lora(config, world) -> RunPlan            cheap checks, before any process group exists
  build_lora_trainer(config, plan, should_stop)  PEFT model, Alpaca loader, validation, exporter

The base model is frozen and PEFT's LoRA adapters are trained through DeepSpeed (world size 1 on
one GPU, or several processes under `deepspeed`). Checkpoints hold the adapters, optimizer and
data position but not the frozen base. At the end: `adapter/` (standard PEFT format, loads with
`PeftModel.from_pretrained`) and `merged/` (adapters folded into the weights: a plain Hugging Face
checkpoint), plus `data_report.json` with the records used and skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig

from data.alpaca import AlpacaExamples, load_alpaca, pad_collate, split_validation
from data.artifacts import write_json_atomic
from data.config import ConfigError
from data.lineage import copy_lineage
from data.loader import GlobalBatchLoader
from data.model_code import copy_model_code
from data.precision import torch_dtype
from training.config import LoRAConfig
from training.distributed import WorldInfo, barrier
from training.export import save_adapter_and_merged, write_lora_template
from training.preflight import RunPlan, check_model_path, load_tokenizer, model_fingerprint, plan_training
from training.run_dir import RunDir
from training.trainer import Trainer, load_model, prepare_run_dir
from training.validation import ValidationLoss


def plan_lora(config: LoRAConfig, world: WorldInfo) -> RunPlan:
    model_path = check_model_path(config.model, config.trust_remote_code)
    load_tokenizer(model_path)
    alpaca = load_alpaca(config.data.source, config.data.split)
    train, _ = split_validation(alpaca, config.data.val_size, config.data.seed)
    total_steps = config.train_steps or math.ceil(config.epochs * len(train) / config.global_batch)
    every = config.checkpoint.every_steps
    saved = {*range(every, total_steps + 1, every), total_steps} if every else {total_steps}
    if config.export == "best" and not any(step % config.validation.every_steps == 0 for step in saved):
        raise ConfigError(f"export=best: no checkpoint of this {total_steps}-step run would have a validation loss; "
                          "let validation.every_steps divide checkpoint.every_steps, or set export=last")
    if config.validation.every_steps and min(config.validation.sequences, config.data.val_size) < world.world_size:
        raise ConfigError(f"validation needs at least one example per rank ({world.world_size}): raise "
                          "data.val_size / validation.sequences or set validation.every_steps=0")
    return plan_training(config, world, model_path, {"data": alpaca.digest, "model": model_fingerprint(model_path)},
                         total_steps, config.data.cutoff_len,
                         {"global_batch": config.global_batch, "data.val_size": config.data.val_size,
                          "data.seed": config.data.seed, "data.cutoff_len": config.data.cutoff_len,
                          "data.train_on_inputs": config.data.train_on_inputs, "lora.r": config.lora.r})


def build_lora_trainer(config: LoRAConfig, plan: RunPlan, should_stop: Callable[[], bool]) -> Trainer:
    rank = plan.world.rank
    tokenizer = load_tokenizer(plan.model_path)
    alpaca = load_alpaca(config.data.source, config.data.split)
    train, held_out = split_validation(alpaca, config.data.val_size, config.data.seed)
    adapters = PeftLoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              bias="none", target_modules=config.lora.target_modules, task_type="CAUSAL_LM")

    def template(directory: Path) -> None:  # base config + tokenizer + adapter config: exports of any checkpoint
        AutoConfig.from_pretrained(plan.model_path).save_pretrained(directory)
        copy_model_code(plan.model_path, directory)
        tokenizer.save_pretrained(directory)
        write_lora_template(directory, plan.model_path, adapters)
        copy_lineage(plan.model_path, directory)  # a pruned base's original block numbers, for the merged model

    prepare_run_dir(config, rank, template)
    run = RunDir(config.output_dir)
    model = get_peft_model(load_model(config, plan), adapters)
    if config.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = pad_collate(pad_id)
    options = (tokenizer, config.data.cutoff_len, config.data.train_on_inputs)
    examples = AlpacaExamples(train, *options)
    if rank == 0:
        write_json_atomic(run.data_report, {
            "source": config.data.source, "records": len(alpaca.records) + sum(alpaca.skipped.values()),
            "used": len(alpaca.records), "skipped": dict(alpaca.skipped), "train": len(train),
            "validation": len(held_out), "train_prompt_fills_cutoff": examples.truncated_away})
        notes = [f"skipped records: {dict(alpaca.skipped)}"] if alpaca.skipped else []
        if examples.truncated_away:
            notes.append(f"{examples.truncated_away} training records have a prompt of {config.data.cutoff_len}+ "
                         "tokens and no response left (raise data.cutoff_len)")
        if notes:
            print("Alpaca data: " + "; ".join(notes) + f" -- see {run.data_report}")
    loader = GlobalBatchLoader(examples, config.global_batch, config.micro_batch, plan.world.world_size, rank,
                               config.data.seed, 0, collate_fn=collate)
    evaluations = []
    if config.validation.every_steps:
        evaluations.append(ValidationLoss(AlpacaExamples(held_out, *options), config.validation.sequences,
                                          config.micro_batch, plan.world, config.validation.every_steps, collate))

    def export(trainer: Trainer) -> Path:
        info = {"step": trainer.step, "fingerprints": plan.fingerprints, "export": config.export}
        if config.export == "best":
            info.update(load_best_adapters(trainer))
        if rank == 0:
            save_adapter_and_merged(trainer.engine.module, tokenizer, run, torch_dtype(plan.precision), info)
        barrier()
        return run.merged

    return Trainer(config, plan, model, loader, should_stop, evaluations, export)


def load_best_adapters(trainer: Trainer) -> dict:
    """Load the adapters of the committed checkpoint with the lowest validation loss into the engine
    (the official run's load_best_model_at_end); every rank calls it. Returns what was chosen."""
    metric = trainer.config.checkpoint.keep_best
    best = trainer.checkpoints.best(metric)
    if best is None:
        raise RuntimeError(f"no committed checkpoint records {metric}: validate at checkpoint steps "
                           "(validation.every_steps dividing checkpoint.every_steps) or set export=last")
    if best.step != trainer.step:
        path, _ = trainer.engine.load_checkpoint(str(best.path.parent), tag=best.tag, load_module_strict=False,
                                                 load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the best checkpoint {best.path}")
    return {"step": best.step, metric: best.metadata()["evaluation"][metric], "last_step": trainer.step}

