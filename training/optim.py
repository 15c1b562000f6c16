"""AdamW with the usual weight-decay exemptions (the learning-rate schedule: training/schedule.py).

Weight decay applies to every tensor with two or more dimensions (projection matrices, token
embeddings, an untied LM head) and not to 1-D tensors (RMSNorm/LayerNorm gains, biases), the
convention of Megatron-LM, GPT-NeoX and Hugging Face's Trainer.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import OptimizerSection


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
