"""AdamW with the usual weight-decay exemptions, and the learning-rate schedule.

Weight decay applies to every tensor with two or more dimensions (projection matrices, token
embeddings, an untied LM head) and not to 1-D tensors (RMSNorm/LayerNorm gains, biases), the
convention of Megatron-LM, GPT-NeoX and Hugging Face's Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from training.config import OptimizerSection, ScheduleSection


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, exempt = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions keep the full shape here
        (decay if ndim >= 2 else exempt).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # ZeRO drops empty groups, which would desync the scheduler


def build_optimizer(model: nn.Module, config: OptimizerSection, fused: bool) -> torch.optim.Optimizer:
    """torch's AdamW as DeepSpeed's client optimizer: no JIT build; fused kernels when on GPU."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=tuple(config.betas), eps=config.eps, fused=fused or None)


def warmup_steps(config: ScheduleSection, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return int(config.warmup_fraction * total_steps)


def lr_multiplier(config: ScheduleSection, total_steps: int) -> Callable[[int], float]:
    """Factor on the peak lr for optimizer step `step` (0-based): linear warmup, then decay."""
    warmup = warmup_steps(config, total_steps)
    floor = config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.decay == "constant" or total_steps <= warmup + 1:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup - 1))
        if config.decay == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleSection,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped by DeepSpeed after every optimizer step; its state travels in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
