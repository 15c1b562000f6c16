"""The DeepSpeed trainer that continued pretraining and LoRA share, readable top to bottom.

  Trainer(config, plan, model, loader, should_stop, evaluations, exporter).train() -> "completed" | "preempted"
                                                                                   | "diverged" | "data exhausted"

A stage plans its run (`training/preflight.plan_training` plus its own checks) and assembles its
parts: the model (`load_model`), a `GlobalBatchLoader`, periodic evaluations and an exporter
(`training/cpt.py`, `training/lora.py`). `Trainer` owns the rest: its DeepSpeed config
(`deepspeed_config`), AdamW + schedule, the engine, resumption from the latest committed
checkpoint (converted to DeepSpeed's universal format first if the world size changed), the loop,
metrics and checkpoints.

Each step (`train`): `accumulation` micro-batches of forward/backward, one optimizer step inside
DeepSpeed, then one all-reduce that averages the loss and lets the ranks agree on two flags: a
stop was requested (SIGUSR1/SIGTERM on any rank) and a timed checkpoint is due (rank 0's clock).
Periodic evaluations (held-out loss, lm-eval zero-shot) run at their steps; checkpoints are saved
every N steps, every T minutes, on a stop and at the end. A stop saves and returns "preempted"; a
mixture's source set that runs out under data.on_exhausted=stop saves, exports and returns "data exhausted".
A non-finite loss or gradient norm: DeepSpeed's overflow check (on for every ZeRO stage and
precision here) skips the optimizer step on every rank; the step is counted and logged, and
`optimizer.max_skipped_steps` in a row end the run with "diverged", without a checkpoint of them.
A step far slower than usual makes the watchdog (`training/watchdog.py`) dump every rank's stacks.
Rank 0's metrics go to metrics.jsonl and the trackers of `logging.trackers` (`training/metrics.py`;
their tracked runs' ids are saved in each checkpoint); `profile.*` wraps chosen steps in torch.profiler
and snapshots CUDA memory when a step runs out of it (`training/profiling.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, set_seed

from data.artifacts import library_versions
from data.config import merge_dicts, save_config, to_dict
from data.loader import DataExhausted, GlobalBatchLoader, to_device
from data.precision import torch_dtype
from training.attention import attach_boundaries, register_varlen
from training.checkpoint import UNIVERSAL_SUFFIX, CheckpointError, CheckpointStore, restore_rng
from training.config import TrainingConfig
from training.distributed import all_sum, barrier
from training.kernels import speed_up
from training.metrics import MetricsLogger
from training.optim import build_optimizer
from training.preflight import RunPlan, checkpoint_store
from training.profiling import oom_snapshot, step_profiler
from training.run_dir import RunDir
from training.schedule import LRPlan, apply_plan, build_scheduler
from training.throughput import flops_per_token, peak_flops, peak_memory_gb
from training.watchdog import StepWatchdog

Metric = float | torch.Tensor | Callable[[], float]


class TrainingLoss(Protocol):
    """The loss of one micro-batch through the engine, with metrics to log. Metrics are averaged over
    the micro-batches and ranks of a step, except seconds (names ending in `_s`), which are summed over
    the micro-batches and also logged as a fraction of the step time. A metric may be a float, a tensor on
    the device, or a function called once the step's work is done (a CUDA event's elapsed time): nothing is
    read back from the device before the step's one wait for it."""

    def __call__(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Metric]]: ...


def metric_value(value: Metric) -> float:
    return value() if callable(value) else float(value)


def diverging(precision: str, loss: float) -> bool:
    """Whether a skipped optimizer step counts towards `optimizer.max_skipped_steps`. Under fp16 a finite loss
    whose scaled gradients overflowed is DeepSpeed's dynamic loss scaling at work (it lowers the scale, and
    stops the run itself at the minimum scale), not a sign of divergence."""
    return precision != "fp16" or not math.isfinite(loss)


def causal_lm_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The model's own next-token cross-entropy (labels shifted inside the model)."""
    return engine(**batch, use_cache=False).loss, {}


class PeriodicEvaluation(Protocol):
    """Runs every `every` steps on all ranks (collectively) and returns metrics to log."""

    name: str
    every: int

    def __call__(self, engine) -> dict[str, float]: ...


def zero_settings(config: TrainingConfig, precision: str) -> dict:
    """ZeRO's part of the DeepSpeed config: stage, overlap, buckets, and (bf16/fp16) fp32 accumulation and reduction."""
    zero = config.zero
    overlap = zero.overlap_comm if zero.overlap_comm is not None else config.zero_stage >= 2
    ds = {"zero_optimization": {"stage": config.zero_stage, "overlap_comm": overlap,
                                "reduce_bucket_size": zero.bucket_size, "allgather_bucket_size": zero.bucket_size,
                                "stage3_gather_16bit_weights_on_model_save": config.zero_stage == 3}}
    if precision != "fp32":
        ds["data_types"] = {"grad_accum_dtype": zero.grad_accum_dtype}
        ds["communication_data_type"] = zero.reduce_dtype
    return ds


def deepspeed_config(config: TrainingConfig, plan: RunPlan) -> dict:
    ds = {
        "train_batch_size": config.global_batch,
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": config.optimizer.grad_clip,
        **zero_settings(config, plan.precision),
        # bf16: each bf16 gradient is added to the fp32 buffer and freed at once (ZeRO-1's BF16_Optimizer would
        # otherwise hold all of them, 2 bytes per parameter, until the step); fp16: dynamic loss scaling
        "bf16": {"enabled": plan.precision == "bf16", "immediate_grad_update": True},
        "fp16": {"enabled": plan.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "checkpoint": {"load_universal": plan.needs_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge_dicts(ds, config.deepspeed)


def load_model(config: TrainingConfig, plan: RunPlan, path: str | None = None,
               random_init: bool = False) -> PreTrainedModel:
    """The model to train (or `path`, a teacher), in the run's precision (ZeRO-3: loaded straight into
    partitions), with its attention implementation, kernels, compiled blocks and activation checkpointing as
    configured. `random_init`: the same architecture, its weights drawn by the model's own `_init_weights`
    (as `from_config` builds it) from `config.seed`, instead of loaded."""
    register_varlen()
    keep_alive = None
    if config.zero_stage == 3:  # while this object lives, from_pretrained loads into ZeRO-3 partitions
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(deepspeed_config(config, plan))
    options = {"dtype": torch_dtype(plan.precision), "attn_implementation": plan.attention,
               "trust_remote_code": config.trust_remote_code}
    if random_init:
        set_seed(config.seed)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(plan.model_path, trust_remote_code=config.trust_remote_code), **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(path or plan.model_path, **options)
    del keep_alive
    model.config.use_cache = False
    if plan.attention == "varlen":
        attach_boundaries(model)
    speed_up(model, config.kernels, config.compile, config.activation_checkpointing)
    return model.to(plan.device) if config.zero_stage != 3 else model


def prepare_run_dir(config: TrainingConfig, rank: int, template: Callable[[Path], None]) -> None:
    """Rank 0 creates the run directory, saves the resolved config and the export template (`template`
    writes it into the directory it is given), clears half-written checkpoints and sets aside committed
    ones whose files are no longer whole. Seeds every RNG alike, so new weights (LoRA adapters) are the
    same on every rank and every run."""
    set_seed(config.seed)
    run = RunDir(config.output_dir)
    if rank == 0:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config)
        run.template.mkdir(exist_ok=True)
        template(run.template)
        store = checkpoint_store(config, rank)
        for name in store.clean_partial():
            print(f"removed {name}: a checkpoint that was being written when the last run stopped")
        for note in store.set_aside_refused():
            print(f"refused checkpoint {note}: set aside as .refused, resuming from an older one")
    barrier()


class Trainer:
    def __init__(self, config: TrainingConfig, plan: RunPlan, model: PreTrainedModel, loader: GlobalBatchLoader,
                 should_stop: Callable[[], bool], evaluations: Sequence[PeriodicEvaluation] = (),
                 exporter: Callable[[Trainer], Path] | None = None, loss: TrainingLoss = causal_lm_loss):
        import deepspeed

        self.config, self.plan, self.should_stop = config, plan, should_stop
        self.rank, self.world_size = plan.world.rank, plan.world.world_size
        self.run = RunDir(config.output_dir)
        self.checkpoints: CheckpointStore = checkpoint_store(config, self.rank)
        self.flops_per_token = flops_per_token(model, plan.seq_len)
        self.peak_flops = peak_flops(plan.device, plan.precision, config.logging.peak_tflops)
        # LoRA: the frozen base model is not trained, so it stays out of every checkpoint
        self.frozen_base = any(not p.requires_grad for p in model.parameters())
        optimizer = build_optimizer(model, config.optimizer, fused=plan.device.type == "cuda")
        self.lr_plan = LRPlan.initial(config.schedule, plan.total_steps)  # a resume restores the run's own
        scheduler = build_scheduler(optimizer, lambda: self.lr_plan)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, plan))
        self.loader, self.evaluations, self.exporter, self.loss = loader, list(evaluations), exporter, loss
        self.step, self.tokens, self.skipped_steps = 0, 0, 0
        self.tracker_states: dict[str, dict] = {}  # the tracked runs (W&B, MLflow) to continue, from a checkpoint
        self.extension: dict[str, float | int | str] = {}  # logged with the first step after an extension
        torch.manual_seed(config.seed + self.rank)  # dropout differs per rank; a resume restores the streams
        if plan.resume_from is not None:
            self.resume()
        self.metrics = MetricsLogger(self.run, self.rank == 0, self.step, plan.total_steps, config.logging,
                                     to_dict(config), self.tracker_states)
        self.profiler = step_profiler(config.profile, self.rank, self.run.profile, plan.device)  # None when off
        self.oom = oom_snapshot(config.profile, self.rank, self.run.profile)
        self.last_save = time.monotonic()
        watchdog = config.watchdog
        self.watchdog = StepWatchdog(self.run.watchdog, self.rank, self.world_size, watchdog.slow_factor,
                                     watchdog.min_seconds, watchdog.window)
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
        skipped_in_a_row = 0
        while self.step < total:
            lr = self.scheduler.get_last_lr()[0]
            started = time.perf_counter()
            self.watchdog.begin(self.step + 1)
            if self.profiler is not None:
                self.profiler.begin(self.step + 1)
            skipped_before = self.engine.skipped_steps
            try:
                local_loss, local_tokens, data_wait, local_extras = self.train_step(batches)
            except DataExhausted as exhausted:  # every rank, before the same step (data.on_exhausted=stop)
                return self.data_exhausted(str(exhausted))
            except torch.OutOfMemoryError:
                if self.oom is not None:  # profile.oom_snapshot: what held the memory, before the error goes on
                    self.oom.dump(self.step + 1)
                raise
            self.step += 1
            timed_save = self.rank == 0 and self.config.checkpoint.every_minutes > 0 and \
                time.monotonic() - self.last_save >= 60 * self.config.checkpoint.every_minutes
            self.watchdog.mark(self.plan.accumulation, "step-end all-reduce")
            loss_sum, tokens, stop_votes, timed_votes, *extras = all_sum(
                [local_loss, local_tokens, float(self.should_stop()), float(timed_save), *local_extras.values()],
                self.plan.device)
            self.watchdog.end()
            elapsed = time.perf_counter() - started
            self.tokens += int(tokens)
            skipped = self.engine.skipped_steps > skipped_before  # DeepSpeed agrees on it across ranks
            self.check_update(loss_sum, skipped)
            self.skipped_steps += skipped
            bad = skipped and diverging(self.plan.precision, loss_sum)
            skipped_in_a_row = skipped_in_a_row + 1 if bad else 0
            metrics = self.step_metrics(loss_sum / self.world_size, lr, tokens / elapsed, elapsed, data_wait)
            metrics.update(self.extension)
            self.extension = {}
            for name, value in zip(local_extras, extras, strict=True):
                metrics[name] = value / self.world_size
                if name.endswith("_s"):
                    metrics[name.removesuffix("_s") + "_fraction"] = value / self.world_size / elapsed
            self.metrics.log(self.step, metrics)
            if self.profiler is not None:
                self.profiler.end(self.step)
            self.metrics.progress(self.step, metrics)
            for note in self.loader.pop_notes():  # a source set of the mixture began a new epoch
                self.metrics.message(f"step {self.step}: {note}")
            if skipped:
                self.metrics.message(f"step {self.step}: non-finite loss ({metrics['train.loss']:.4g}) or gradient "
                                     f"norm: optimizer step skipped ({skipped_in_a_row} in a row, "
                                     f"{self.skipped_steps} in all)"
                                     + ("; fp16: DeepSpeed lowered the loss scale" if self.plan.precision == "fp16"
                                        else ""))
            if skipped_in_a_row >= self.config.optimizer.max_skipped_steps:
                return self.diverged(skipped_in_a_row)
            self.evaluate(self.step)
            every = self.config.checkpoint.every_steps
            if stop_votes or timed_votes or (every and self.step % every == 0) or self.step == total:
                self.save()
            if stop_votes and self.step < total:
                self.metrics.message(f"stop requested: checkpoint at step {self.step} committed, exiting")
                self.close("preempted")
                return "preempted"
        if self.config.checkpoint.export_at_end:
            self.export()
        self.close("completed")
        return "completed"

    def close(self, outcome: str) -> None:
        self.watchdog.close()
        self.metrics.close(outcome)

    def check_update(self, loss_sum: float, skipped: bool) -> None:
        """A non-finite loss must have made DeepSpeed skip the update; if it did not (its overflow check
        turned off through the `deepspeed` overrides), the weights are no longer trustworthy."""
        if not math.isfinite(loss_sum) and not skipped:
            latest = self.checkpoints.latest()
            raise FloatingPointError(f"the training loss is {loss_sum} at step {self.step} and DeepSpeed applied the "
                                     "update anyway (keep zero_optimization.compute_grad_norm and "
                                     "bf16.check_grad_overflow on); resume from "
                                     f"{latest.path if latest else 'the start'}")

    def diverged(self, in_a_row: int) -> str:
        latest = self.checkpoints.latest()
        self.metrics.message(
            f"stopping: {in_a_row} optimizer steps in a row (steps {self.step - in_a_row + 1}..{self.step}) had a "
            f"non-finite loss or gradient norm (optimizer.max_skipped_steps={self.config.optimizer.max_skipped_steps})."
            f" The last good checkpoint is {latest.path if latest else '(none: the start)'}; resume from it with a "
            "lower optimizer.lr, or look at the data of those steps")
        self.close("diverged")
        return "diverged"

    def data_exhausted(self, reason: str) -> str:
        """The run ends where the data does (a mixture's set ran out, data.on_exhausted=stop): checkpoint, export."""
        self.metrics.message(f"stopping after step {self.step}: {reason}")
        latest = self.checkpoints.latest()
        if self.step and (latest is None or latest.step != self.step):
            self.save()
        if self.config.checkpoint.export_at_end and self.step:
            self.export()
        self.close("completed")  # trackers: a configured end, like the last step
        return "data exhausted"

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int, float, dict[str, float]]:
        """One optimizer step: forward/backward over the micro-batches; DeepSpeed steps at the boundary.
        Returns this rank's mean loss, its tokens (padding excluded), the seconds spent waiting for data
        and the loss's own metrics (see `TrainingLoss`)."""
        losses, tokens, data_wait, extras = [], 0, 0.0, {}
        for micro in range(self.plan.accumulation):
            self.watchdog.mark(micro, "data")
            waited = time.perf_counter()
            batch = to_device(next(batches), self.plan.device)
            data_wait += time.perf_counter() - waited
            self.watchdog.mark(micro, "forward")
            loss, loss_metrics = self.loss(self.engine, batch)
            self.watchdog.mark(micro, "backward")
            self.engine.backward(loss)
            self.watchdog.mark(micro, "optimizer step")
            self.engine.step()
            losses.append(loss.detach().float())
            for name, value in loss_metrics.items():
                extras.setdefault(name, []).append(value)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        mean_loss = float(torch.stack(losses).mean())  # the step's one wait for the device
        return mean_loss, tokens, data_wait, {
            name: sum(map(metric_value, values)) / (1 if name.endswith("_s") else len(values))
            for name, values in extras.items()}

    def step_metrics(self, loss: float, lr: float, tokens_per_s: float, elapsed: float,
                     data_wait: float) -> dict[str, float | None]:
        grad_norm = self.engine.get_global_grad_norm()
        mfu = self.flops_per_token * tokens_per_s / (self.world_size * self.peak_flops) if self.peak_flops else None
        return {"train.loss": loss, "train.lr": lr,
                "train.grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train.tokens": self.tokens, "train.skipped_steps": self.skipped_steps,
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
        """Our part of a checkpoint, plain types only: it goes to shorten_checkpoint.json, not into a pickle."""
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "loader": self.loader.state_dict(), "world_size": self.world_size,
                "schedule": self.lr_plan.state(),
                "evaluation": self.evaluation[1] if self.evaluation[0] == self.step else {},
                "config": to_dict(self.config), "fingerprints": self.plan.fingerprints,
                "versions": library_versions(), "trackers": self.metrics.tracker_states()}

    def save(self) -> None:
        started = time.perf_counter()
        path = self.checkpoints.save(self.engine, self.step, self.client_state(), exclude_frozen=self.frozen_base)
        self.last_save = time.monotonic()
        self.metrics.log(self.step, {"time.checkpoint_s": time.perf_counter() - started})
        self.metrics.message(f"checkpoint committed: {path}")

    def resume(self) -> None:
        checkpoint = self.plan.resume_from
        # a world-size change: converted before the process group existed (training/preflight.py)
        tag = checkpoint.tag + UNIVERSAL_SUFFIX if self.plan.needs_universal else checkpoint.tag
        path, _ = self.engine.load_checkpoint(str(checkpoint.path.parent), tag=tag,
                                              load_module_strict=not self.frozen_base)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {checkpoint.path.parent / tag}")
        state = checkpoint.metadata()
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens, self.skipped_steps = state["step"], state["tokens"], state.get("skipped_steps", 0)
        self.tracker_states = state.get("trackers", {})
        rng = None if self.plan.needs_universal else self.checkpoints.rng_state(checkpoint)
        if rng is not None:
            restore_rng(rng)
        if self.rank == 0:
            print(f"resumed from {checkpoint.path} at step {self.step} "
                  f"({self.loader.consumed_samples:,} samples consumed)")
        if "schedule" in state:
            self.lr_plan = LRPlan.from_state(state["schedule"])
            if self.lr_plan.total != self.plan.total_steps:  # preflight made sure on_extend says how
                self.extend_schedule()

    def extend_schedule(self) -> None:
        """Re-plan the learning rate from the scheduler's position to the new total (`schedule.on_extend`)."""
        mode, position, before = self.config.schedule.on_extend, self.scheduler.last_epoch, self.lr_plan.total
        self.lr_plan = self.lr_plan.extended(position, self.plan.total_steps, mode, self.config.schedule)
        apply_plan(self.scheduler)
        self.extension = {"schedule.on_extend": mode, "schedule.planned_steps": before,
                          "schedule.total_steps": self.plan.total_steps}
        if self.rank == 0:
            print(f"schedule extended from {before} to {self.plan.total_steps} steps (schedule.on_extend={mode}): "
                  f"lr {self.scheduler.get_last_lr()[0]:.3g} at step {self.step + 1}, "
                  f"{self.config.optimizer.lr * self.lr_plan.multiplier(self.plan.total_steps - 1):.3g} at the end")

    def export(self) -> None:
        if self.exporter is not None:
            self.metrics.message(f"exported: {self.exporter(self)}")

