"""Continued pretraining with DeepSpeed ZeRO, readable top to bottom.

  build_cpt_trainer(config, plan, should_stop).train() -> "completed" | "preempted"

A stage assembles its parts (model, loader, periodic evaluations, exporter; `build_cpt_trainer`
here, `training/lora.py` for LoRA) and hands them to `Trainer`, which owns the rest: AdamW +
schedule, the DeepSpeed engine, resumption from the latest committed checkpoint (converted to
DeepSpeed's universal format first if the world size changed), the loop, metrics, checkpoints.

Each step (`train`): `accumulation` micro-batches of forward/backward, one optimizer step inside
DeepSpeed, then one all-reduce that averages the loss and lets the ranks agree on two flags: a
stop was requested (SIGUSR1/SIGTERM on any rank) and a timed checkpoint is due (rank 0's clock).
Periodic evaluations (held-out loss, lm-eval zero-shot) run at their steps; checkpoints are saved
every N steps, every T minutes, on a stop and at the end. A stop saves and returns "preempted".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, set_seed

from data.artifacts import library_versions
from data.config import merge_dicts, save_config, to_dict
from data.packed import PackedLoader, PackedSequences
from training.checkpoint import CheckpointError, CheckpointStore, convert_to_universal, restore_rng, tag_for
from training.config import CPTConfig, TrainingConfig
from training.distributed import all_sum, barrier, broadcast_object
from training.export import DTYPES, TEMPLATE_DIR, export_from_engine
from training.metrics import MetricsLogger
from training.optim import build_optimizer, build_scheduler
from training.preflight import RunPlan, checkpoint_store, load_tokenizer
from training.throughput import flops_per_token, peak_flops, peak_memory_gb
from training.validation import ValidationLoss
from training.zeroshot import ZeroShotEvaluation


class PeriodicEvaluation(Protocol):
    """Runs every `every` steps on all ranks (collectively) and returns metrics to log."""

    name: str
    every: int

    def __call__(self, engine) -> dict[str, float]: ...


def deepspeed_config(config: TrainingConfig, plan: RunPlan) -> dict:
    ds = {
        "train_batch_size": config.global_batch,
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": config.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": config.zero_stage == 3},
        "bf16": {"enabled": plan.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "checkpoint": {"load_universal": plan.needs_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge_dicts(ds, config.deepspeed)


def load_model(config: TrainingConfig, plan: RunPlan, ds_config: dict) -> PreTrainedModel:
    keep_alive = None
    if config.zero_stage == 3:  # while this object lives, from_pretrained loads into ZeRO-3 partitions
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=DTYPES[plan.precision],
                                                 attn_implementation=config.attn_implementation)
    del keep_alive
    model.config.use_cache = False
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(plan.device) if config.zero_stage != 3 else model


def prepare_run_dir(config: TrainingConfig, checkpoints: CheckpointStore, rank: int) -> None:
    """Rank 0 creates the run directory, saves the resolved config and clears half-written checkpoints.
    Seeds every RNG alike, so new weights (LoRA adapters) are the same on every rank and every run."""
    set_seed(config.seed)
    if rank == 0:
        (config.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, config.output_dir / "config.yaml")
        for name in checkpoints.clean_partial():
            print(f"removed {name}: a checkpoint that was being written when the last run stopped")
    barrier()


class Trainer:
    def __init__(self, config: TrainingConfig, plan: RunPlan, model: PreTrainedModel, loader: PackedLoader,
                 should_stop: Callable[[], bool], evaluations: Sequence[PeriodicEvaluation] = (),
                 exporter: Callable[[Trainer], Path] | None = None, ds_config: dict | None = None):
        import deepspeed

        self.config, self.plan, self.should_stop = config, plan, should_stop
        self.rank, self.world_size = plan.world.rank, plan.world.world_size
        self.run_dir = config.output_dir
        self.checkpoints: CheckpointStore = checkpoint_store(config, self.rank)
        self.flops_per_token = flops_per_token(model, plan.seq_len)
        self.peak_flops = peak_flops(plan.device, plan.precision, config.logging.peak_tflops)
        # LoRA: the frozen base model is not trained, so it stays out of every checkpoint
        self.frozen_base = any(not p.requires_grad for p in model.parameters())
        optimizer = build_optimizer(model, config.optimizer, fused=plan.device.type == "cuda")
        scheduler = build_scheduler(optimizer, config.schedule, plan.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config or deepspeed_config(config, plan))
        self.loader, self.evaluations, self.exporter = loader, list(evaluations), exporter
        self.step, self.tokens = 0, 0
        torch.manual_seed(config.seed + self.rank)  # dropout differs per rank; a resume restores the streams
        if plan.resume_from is not None:
            self.resume()
        self.metrics = MetricsLogger(self.run_dir, self.rank == 0, self.step, plan.total_steps,
                                     config.logging.tensorboard, config.logging.every_steps)
        self.last_save = time.monotonic()
        self.evaluation: tuple[int, dict[str, float]] = (-1, {})  # the latest step's evaluation results

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> str:
        total = self.plan.total_steps
        self.metrics.message(f"training steps {self.step + 1}..{total}: {self.world_size} ranks x micro-batch "
                             f"{self.config.micro_batch} x accumulation {self.plan.accumulation} = "
                             f"{self.config.global_batch} sequences of up to {self.plan.seq_len} tokens, "
                             f"ZeRO-{self.config.zero_stage}, {self.plan.precision}")
        if self.step == 0:
            self.evaluate(0, force=True)  # the starting point, for the curves
        batches = iter(self.loader)
        while self.step < total:
            lr = self.scheduler.get_last_lr()[0]
            started = time.perf_counter()
            local_loss, local_tokens, data_wait = self.train_step(batches)
            elapsed = time.perf_counter() - started
            self.step += 1
            timed_save = self.rank == 0 and self.config.checkpoint.every_minutes > 0 and \
                time.monotonic() - self.last_save >= 60 * self.config.checkpoint.every_minutes
            loss_sum, tokens, stop_votes, timed_votes = all_sum(
                [local_loss, local_tokens, float(self.should_stop()), float(timed_save)], self.plan.device)
            self.tokens += int(tokens)
            if not math.isfinite(loss_sum):
                latest = self.checkpoints.latest()
                raise FloatingPointError(f"the training loss is {loss_sum} at step {self.step}; resume from "
                                         f"{latest.path if latest else 'the start'} with a lower optimizer.lr")
            metrics = self.step_metrics(loss_sum / self.world_size, lr, tokens / elapsed, elapsed, data_wait)
            self.metrics.log(self.step, metrics)
            self.metrics.progress(self.step, metrics)
            self.evaluate(self.step)
            every = self.config.checkpoint.every_steps
            if stop_votes or timed_votes or (every and self.step % every == 0) or self.step == total:
                self.save()
            if stop_votes and self.step < total:
                self.metrics.message(f"stop requested: checkpoint at step {self.step} committed, exiting")
                self.metrics.close()
                return "preempted"
        if self.config.checkpoint.export_at_end:
            self.export()
        self.metrics.close()
        return "completed"

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int, float]:
        """One optimizer step: forward/backward over the micro-batches; DeepSpeed steps at the boundary.
        Returns this rank's mean loss, its tokens (padding excluded) and the seconds spent waiting for data."""
        losses, tokens, data_wait = [], 0, 0.0
        for _ in range(self.plan.accumulation):
            waited = time.perf_counter()
            batch = {k: v.to(self.plan.device, non_blocking=True) for k, v in next(batches).items()}
            data_wait += time.perf_counter() - waited
            loss = self.engine(**batch, use_cache=False).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return float(torch.stack(losses).mean()), tokens, data_wait

    def step_metrics(self, loss: float, lr: float, tokens_per_s: float, elapsed: float,
                     data_wait: float) -> dict[str, float | None]:
        grad_norm = self.engine.get_global_grad_norm()
        mfu = self.flops_per_token * tokens_per_s / (self.world_size * self.peak_flops) if self.peak_flops else None
        return {"train.loss": loss, "train.lr": lr,
                "train.grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train.tokens": self.tokens,
                "perf.tokens_per_s": tokens_per_s, "perf.step_s": elapsed, "perf.mfu": mfu,
                "perf.data_wait_fraction": data_wait / elapsed, "perf.memory_gb": peak_memory_gb(self.plan.device)}

    def evaluate(self, step: int, force: bool = False) -> None:
        for evaluation in self.evaluations:
            if force or step % evaluation.every == 0:
                started = time.perf_counter()
                results = evaluation(self.engine)
                results[f"time.{evaluation.name}_s"] = time.perf_counter() - started
                merged = self.evaluation[1] if self.evaluation[0] == step else {}
                self.evaluation = (step, {**merged, **results})  # saved with a checkpoint of this step
                self.metrics.log(step, results)
                self.metrics.message(f"step {step} {evaluation.name}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in results.items() if not k.startswith("time.")))

    # ---- checkpoints ----------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens,
                "loader": self.loader.state_dict(), "world_size": self.world_size,
                "evaluation": self.evaluation[1] if self.evaluation[0] == self.step else {},
                "config": to_dict(self.config), "fingerprints": self.plan.fingerprints,
                "versions": library_versions()}

    def save(self) -> None:
        started = time.perf_counter()
        state = self.client_state()
        path = self.checkpoints.save(self.engine, self.step, {"client_state": state}, state,
                                     exclude_frozen=self.frozen_base)
        self.last_save = time.monotonic()
        self.metrics.log(self.step, {"time.checkpoint_s": time.perf_counter() - started})
        self.metrics.message(f"checkpoint committed: {path}")

    def resume(self) -> None:
        checkpoint = self.plan.resume_from
        tag = checkpoint.tag
        if self.plan.needs_universal:
            if self.rank == 0:
                print(f"world size {checkpoint.metadata()['world_size']} -> {self.world_size}: converting "
                      f"{checkpoint.tag} to DeepSpeed's universal format")
            error = None
            if self.rank == 0:
                try:
                    tag = convert_to_universal(checkpoint).name
                except CheckpointError as err:
                    error = str(err)
            tag, error = broadcast_object((tag, error))
            if error:
                raise CheckpointError(error)
        path, client = self.engine.load_checkpoint(str(checkpoint.path.parent), tag=tag,
                                                   load_module_strict=not self.frozen_base)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {checkpoint.path.parent / tag}")
        state = client["client_state"]
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        rng = None if self.plan.needs_universal else self.checkpoints.rng_state(checkpoint)
        if rng is not None:
            restore_rng(rng)
        if self.rank == 0:
            print(f"resumed from {checkpoint.path} at step {self.step} "
                  f"({self.loader.consumed_samples:,} samples consumed)")

    def export(self) -> None:
        if self.exporter is not None:
            self.metrics.message(f"exported: {self.exporter(self)}")


def build_cpt_trainer(config: CPTConfig, plan: RunPlan, should_stop: Callable[[], bool]) -> Trainer:
    """Continued pretraining's parts: the pruned model, packed token data, held-out loss, zero-shot,
    and a Hugging Face export of the final weights."""
    rank = plan.world.rank
    tokenizer = load_tokenizer(plan.model_path)
    prepare_run_dir(config, checkpoint_store(config, rank), rank)
    ds_config = deepspeed_config(config, plan)
    model = load_model(config, plan, ds_config)
    if rank == 0:  # config + tokenizer: what an export of any checkpoint needs besides the weights
        model.config.save_pretrained(config.output_dir / TEMPLATE_DIR)
        tokenizer.save_pretrained(config.output_dir / TEMPLATE_DIR)
    data = config.data
    loader = PackedLoader(PackedSequences(data.path, data.seq_len, "train", data.document_masking),
                          config.global_batch, config.micro_batch, plan.world.world_size, rank, data.seed,
                          data.num_workers)
    evaluations: list[PeriodicEvaluation] = []
    if config.validation.every_steps and config.validation.sequences:
        held_out = PackedSequences(data.path, data.seq_len, "validation", data.document_masking)
        evaluations.append(ValidationLoss(held_out, config.validation.sequences, config.micro_batch, plan.world,
                                          config.validation.every_steps))
    if plan.zeroshot_tasks is not None:
        zeroshot = config.zeroshot
        evaluations.append(ZeroShotEvaluation(plan.zeroshot_tasks, zeroshot.tasks, tokenizer, zeroshot.every_steps,
                                              zeroshot.batch_size, data.seq_len, zeroshot.limit,
                                              zeroshot.add_bos_token))

    def export(trainer: Trainer) -> Path:
        info = {"step": trainer.step, "tokens": trainer.tokens, "fingerprints": plan.fingerprints,
                "source_run": str(config.output_dir)}
        return export_from_engine(trainer.engine, config.zero_stage, rank, tokenizer,
                                  config.output_dir / "exports" / tag_for(trainer.step), DTYPES[plan.precision], info)

    return Trainer(config, plan, model, loader, should_stop, evaluations, export, ds_config)
