"""Continued pretraining with DeepSpeed ZeRO, readable top to bottom.

  Trainer(config, plan, should_stop).train() -> "completed" | "preempted"

Set-up (`__init__`): run directory, model (loaded straight into ZeRO-3 partitions under stage 3),
AdamW + schedule, the DeepSpeed engine, the packed-data loader, and resumption from the latest
committed checkpoint (converted to DeepSpeed's universal format first if the world size changed).

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
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from data.artifacts import library_versions
from data.config import save_config, to_dict
from data.packed import PackedLoader, PackedSequences
from training.checkpoint import CheckpointError, CheckpointStore, convert_to_universal, restore_rng
from training.config import CPTConfig
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


def deepspeed_config(config: CPTConfig, plan: RunPlan) -> dict:
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
    return merge(ds, config.deepspeed)


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_model(config: CPTConfig, plan: RunPlan, ds_config: dict) -> PreTrainedModel:
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


class Trainer:
    def __init__(self, config: CPTConfig, plan: RunPlan, should_stop: Callable[[], bool],
                 evaluations: Sequence[PeriodicEvaluation] = ()):
        import deepspeed

        self.config, self.plan, self.should_stop = config, plan, should_stop
        self.rank, self.world_size = plan.world.rank, plan.world.world_size
        self.run_dir = config.output_dir
        self.checkpoints: CheckpointStore = checkpoint_store(config, self.rank)
        self.tokenizer = load_tokenizer(plan.model_path)
        if self.rank == 0:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
            self.tokenizer.save_pretrained(self.run_dir / TEMPLATE_DIR)
            for name in self.checkpoints.clean_partial():
                print(f"removed {name}: a checkpoint that was being written when the last run stopped")
        barrier()

        ds_config = deepspeed_config(config, plan)
        model = load_model(config, plan, ds_config)
        if self.rank == 0:
            model.config.save_pretrained(self.run_dir / TEMPLATE_DIR)
        self.flops_per_token = flops_per_token(model, config.data.seq_len)
        self.peak_flops = peak_flops(plan.device, plan.precision, config.logging.peak_tflops)
        optimizer = build_optimizer(model, config.optimizer, fused=plan.device.type == "cuda")
        scheduler = build_scheduler(optimizer, config.schedule, plan.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=ds_config)
        dataset = PackedSequences(config.data.path, config.data.seq_len, "train", config.data.document_masking)
        self.loader = PackedLoader(dataset, config.global_batch, config.micro_batch, self.world_size, self.rank,
                                   config.data.seed, config.data.num_workers)
        self.evaluations: list[PeriodicEvaluation] = list(evaluations)
        if config.validation.every_steps and config.validation.sequences:
            held_out = PackedSequences(config.data.path, config.data.seq_len, "validation",
                                       config.data.document_masking)
            self.evaluations.insert(0, ValidationLoss(held_out, config.validation.sequences, config.micro_batch,
                                                      plan.world, config.validation.every_steps))
        if plan.zeroshot_tasks is not None:
            zeroshot = config.zeroshot
            self.evaluations.append(ZeroShotEvaluation(plan.zeroshot_tasks, zeroshot.tasks, self.tokenizer,
                                                       zeroshot.every_steps, zeroshot.batch_size,
                                                       config.data.seq_len, zeroshot.limit))
        self.step = 0
        if plan.resume_from is not None:
            self.resume()
        self.metrics = MetricsLogger(self.run_dir, self.rank == 0, self.step, plan.total_steps,
                                     config.logging.tensorboard, config.logging.every_steps)
        self.last_save = time.monotonic()

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> str:
        total = self.plan.total_steps
        self.metrics.message(f"training steps {self.step + 1}..{total}: {self.world_size} ranks x micro-batch "
                             f"{self.config.micro_batch} x accumulation {self.plan.accumulation} = "
                             f"{self.config.global_batch} sequences of {self.config.data.seq_len} tokens, "
                             f"ZeRO-{self.config.zero_stage}, {self.plan.precision}")
        if self.step == 0:
            self.evaluate(0, force=True)  # the starting point, for the curves
        batches = iter(self.loader)
        while self.step < total:
            lr = self.scheduler.get_last_lr()[0]
            started = time.perf_counter()
            local_loss, data_wait = self.train_step(batches)
            elapsed = time.perf_counter() - started
            self.step += 1
            timed_save = self.rank == 0 and self.config.checkpoint.every_minutes > 0 and \
                time.monotonic() - self.last_save >= 60 * self.config.checkpoint.every_minutes
            loss_sum, stop_votes, timed_votes = all_sum([local_loss, float(self.should_stop()), float(timed_save)],
                                                        self.plan.device)
            if not math.isfinite(loss_sum):
                latest = self.checkpoints.latest()
                raise FloatingPointError(f"the training loss is {loss_sum} at step {self.step}; resume from "
                                         f"{latest.path if latest else 'the start'} with a lower optimizer.lr")
            metrics = self.step_metrics(loss_sum / self.world_size, lr, elapsed, data_wait)
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

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step: forward/backward over the micro-batches; DeepSpeed steps at the boundary."""
        losses, data_wait = [], 0.0
        for _ in range(self.plan.accumulation):
            waited = time.perf_counter()
            batch = {k: v.to(self.plan.device, non_blocking=True) for k, v in next(batches).items()}
            data_wait += time.perf_counter() - waited
            loss = self.engine(**batch, use_cache=False).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        return float(torch.stack(losses).mean()), data_wait

    def step_metrics(self, loss: float, lr: float, elapsed: float, data_wait: float) -> dict[str, float | None]:
        tokens_per_s = self.plan.tokens_per_step / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        mfu = self.flops_per_token * tokens_per_s / (self.world_size * self.peak_flops) if self.peak_flops else None
        return {"train.loss": loss, "train.lr": lr,
                "train.grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train.tokens": self.step * self.plan.tokens_per_step,
                "perf.tokens_per_s": tokens_per_s, "perf.step_s": elapsed, "perf.mfu": mfu,
                "perf.data_wait_fraction": data_wait / elapsed, "perf.memory_gb": peak_memory_gb(self.plan.device)}

    def evaluate(self, step: int, force: bool = False) -> None:
        for evaluation in self.evaluations:
            if force or step % evaluation.every == 0:
                started = time.perf_counter()
                results = evaluation(self.engine)
                results[f"time.{evaluation.name}_s"] = time.perf_counter() - started
                self.metrics.log(step, results)
                self.metrics.message(f"step {step} {evaluation.name}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in results.items() if not k.startswith("time.")))

    # ---- checkpoints ----------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "tokens": self.step * self.plan.tokens_per_step,
                "loader": self.loader.state_dict(), "world_size": self.world_size,
                "config": to_dict(self.config), "fingerprints": self.plan.fingerprints,
                "versions": library_versions()}

    def save(self) -> None:
        started = time.perf_counter()
        state = self.client_state()
        path = self.checkpoints.save(self.engine, self.step, {"client_state": state}, state)
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
        path, client = self.engine.load_checkpoint(str(checkpoint.path.parent), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {checkpoint.path.parent / tag}")
        state = client["client_state"]
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        rng = None if self.plan.needs_universal else self.checkpoints.rng_state(checkpoint)
        if rng is not None:
            restore_rng(rng)
        if self.rank == 0:
            print(f"resumed from {checkpoint.path} at step {self.step} "
                  f"({self.loader.consumed_samples:,} samples consumed)")

    def export(self) -> None:
        output = self.run_dir / "exports" / f"step_{self.step:08d}"
        info = {"step": self.step, "tokens": self.step * self.plan.tokens_per_step,
                "fingerprints": self.plan.fingerprints, "source_run": str(self.run_dir)}
        export_from_engine(self.engine, self.config.zero_stage, self.rank, self.tokenizer, output,
                           DTYPES[self.plan.precision], info)
        self.metrics.message(f"Hugging Face checkpoint: {output}")
