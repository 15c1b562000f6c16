"""Knowledge distillation from the unpruned model during continued pretraining (after Minitron).

  loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher || student)

on the same packed batch (the teacher sees the same input_ids and position_ids, so document
masking applies to both terms), averaged over the positions whose next-token label is not ignored.
The teacher runs forward only, without gradients, in the training precision; it never enters the
optimizer or a checkpoint. Under ZeRO-3 it is partitioned like the student (a DeepSpeed engine
without an optimizer), elsewhere each rank holds a replica.

The KL is computed by `chunked_kl`, a custom autograd function that walks the vocabulary in
chunks: the fp32 copies of both logit tensors ([tokens, vocab] each) are never materialised, only
[tokens, chunk] at a time, and the backward pass writes the gradient chunk by chunk,
(softmax(s/T) - softmax(t/T)) / T, in the student logits' dtype.

With `top_k` the teacher's logits are cut to their k largest entries per position right after its
forward ([tokens, k] values and indices are kept, not [tokens, vocab]), and `top_k_kl` compares the
two models on those k entries only, each distribution renormalised over them: NVIDIA
Model-Optimizer's `TopKLogitsKLLoss` (modelopt/torch/distill/plugins/megatron.py, `logit_kl_topk`).
The student's probability mass outside the teacher's top k takes no part in the loss and gets no
gradient (no "rest" bucket).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data.nll import IGNORE_INDEX
from training.config import TrainingConfig
from training.preflight import RunPlan
from training.trainer import Metric, deepspeed_config, load_model

DEFAULT_CHUNK = 8192


def _chunks(vocab: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]


def _logsumexp(logits: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """fp32 logsumexp over the last dimension of logits / T, one vocabulary chunk at a time."""
    result = None
    for part in _chunks(logits.shape[-1], chunk):
        piece = torch.logsumexp(logits[..., part].float() / temperature, dim=-1)
        result = piece if result is None else torch.logaddexp(result, piece)
    return result


class ChunkedKL(torch.autograd.Function):
    """sum_i w_i KL(softmax(t_i/T) || softmax(s_i/T)) / sum_i w_i over rows i of [N, V] logits."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        lse_s = _logsumexp(student, temperature, chunk)
        lse_t = _logsumexp(teacher, temperature, chunk)
        per_row = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        for part in _chunks(student.shape[-1], chunk):
            log_t = teacher[:, part].float() / temperature - lse_t[:, None]
            log_s = student[:, part].float() / temperature - lse_s[:, None]
            per_row += (log_t.exp() * (log_t - log_s)).sum(-1)
        weights = weights.float()
        total = weights.sum().clamp_min(1.0)
        ctx.save_for_backward(student, teacher, weights, lse_s, lse_t)
        ctx.temperature, ctx.chunk, ctx.total = temperature, chunk, total
        return (per_row * weights).sum() / total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher, weights, lse_s, lse_t = ctx.saved_tensors
        temperature = ctx.temperature
        scale = (grad_output.float() * weights / (ctx.total * temperature))[:, None]
        grad = torch.empty_like(student)
        for part in _chunks(student.shape[-1], ctx.chunk):
            p_s = (student[:, part].float() / temperature - lse_s[:, None]).exp()
            p_t = (teacher[:, part].float() / temperature - lse_t[:, None]).exp()
            grad[:, part] = ((p_s - p_t) * scale).to(student.dtype)
        return grad, None, None, None, None


def chunked_kl(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0,
               chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Forward KL(teacher || student) per row of [N, V] logits, weighted by `weights` [N] and averaged."""
    return ChunkedKL.apply(student, teacher.detach(), weights, temperature, chunk)


def top_k_kl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k entries, both renormalised over them, weighted by
    `weights` and averaged. `student`: [..., vocab] logits; `values`, `indices`: the teacher's top k, [..., k]."""
    log_t = F.log_softmax(values.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student.gather(-1, indices).float() / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1).reshape(-1)
    weights = weights.float()
    return (per_row * weights).sum() / weights.sum().clamp_min(1.0)


def top_k_mass(logits: torch.Tensor, values: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """The teacher's probability mass in its top k `values` per row of [..., vocab] `logits`: what top-k KD sees."""
    top = torch.logsumexp(values.float() / temperature, dim=-1)
    return (top - _logsumexp(logits, temperature, chunk)).exp()


def kd_positions(labels: torch.Tensor) -> torch.Tensor:
    """Weights [B*(S-1)] of the logit positions that predict a real next token (1) or not (0)."""
    return (labels[:, 1:] != IGNORE_INDEX).reshape(-1).float()


def teacher_clock(device: torch.device) -> Callable[[], Metric]:
    """Start timing the teacher's work; the returned function stops and gives its seconds. On a GPU these are
    CUDA events, read once the step is done: timing costs no wait for the device."""
    if device.type != "cuda":
        started = time.perf_counter()
        return lambda: time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def stop() -> Metric:
        end.record()
        return lambda: start.elapsed_time(end) / 1000

    return stop


class TopK(NamedTuple):
    """The teacher's k largest logits and their vocabulary indices, [batch, positions, k] each."""

    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class DistillLoss:
    """The CPT loss with a teacher: `loss(engine, batch) -> (loss, metrics)` for the Trainer.

    Both models run without labels: the student's logits come back whatever computes its loss (Liger's fused
    loss returns none when given labels), and with alpha = 0 no cross-entropy (an fp32 copy of the logits) is
    built at all. With alpha > 0 the cross-entropy is the model's own `loss_function` on those logits, the
    computation plain CPT runs inside the model."""

    teacher: torch.nn.Module
    alpha: float
    temperature: float
    chunk: int = DEFAULT_CHUNK
    top_k: int | None = None

    def __call__(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Metric]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        weights = kd_positions(batch["labels"])
        stop = teacher_clock(batch["input_ids"].device)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits
            target, metrics = self.teacher_target(teacher_logits[:, :-1], weights)
            del teacher_logits  # with top_k only [tokens, k] lives on through the student's step
        teacher_seconds = stop()
        logits = engine(**inputs, use_cache=False).logits
        kd = self.kl(logits[:, :-1], target, weights)
        loss = (1 - self.alpha) * self.temperature ** 2 * kd
        metrics.update({"train.kd": kd.detach(), "perf.teacher_s": teacher_seconds})
        if self.alpha > 0:
            model = getattr(engine, "module", engine)
            ce = model.loss_function(logits=logits, labels=batch["labels"], vocab_size=model.config.vocab_size)
            loss = self.alpha * ce + loss
            metrics["train.ce"] = ce.detach()
        return loss, metrics

    def teacher_target(self, logits: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor | TopK, dict]:
        """What the KL needs of the teacher's [batch, positions, vocab] logits: all of them, or their top k
        (and, logged, the share of the teacher's probability those k hold: a tensor, read after the step)."""
        if not self.top_k:
            return logits, {}
        top = TopK(*logits.topk(self.top_k, dim=-1))
        mass = top_k_mass(logits, top.values, self.temperature, self.chunk).reshape(-1)
        return top, {"train.kd_top_k_mass": (mass * weights).sum() / weights.sum().clamp_min(1.0)}

    def kl(self, student: torch.Tensor, target: torch.Tensor | TopK, weights: torch.Tensor) -> torch.Tensor:
        """The KL term on the student's [batch, positions, vocab] logits."""
        if isinstance(target, TopK):
            return top_k_kl(student, target.values, target.indices, weights, self.temperature)
        vocab = student.shape[-1]
        return chunked_kl(student.reshape(-1, vocab), target.reshape(-1, vocab), weights, self.temperature,
                          self.chunk)


def load_teacher(config: TrainingConfig, plan: RunPlan, path: str) -> torch.nn.Module:
    """The teacher for forward passes only: frozen, in eval mode, in the training precision. Under ZeRO-3 a
    DeepSpeed engine without an optimizer holds it partitioned like the student; elsewhere a full replica."""
    teacher = load_model(config, plan, path)
    teacher.requires_grad_(False)
    if config.zero_stage == 3:
        import deepspeed

        ds_config = {k: v for k, v in deepspeed_config(config, plan).items() if k != "checkpoint"}
        teacher = deepspeed.initialize(model=teacher, config=ds_config)[0]
    if config.activation_checkpointing:  # nothing to recompute without gradients
        (teacher.module if config.zero_stage == 3 else teacher).gradient_checkpointing_disable()
    teacher.eval()  # a DeepSpeed engine's eval() returns None
    return teacher
