"""The model's own computation, made cheaper: Liger's fused kernels, torch.compile of each block, and
activation checkpointing of all or some blocks.

  check_kernels(kernels, device, zero_stage)   before any process group: liger needs a CUDA GPU, its package
                                               and ZeRO-1/2
  speed_up(model, kernels, compile, checkpointing)   on the loaded model, before DeepSpeed wraps it

`kernels=liger` swaps in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, and a fused linear
cross-entropy that never materialises the fp32 logits) for the model types Liger knows; a model it
does not know is refused rather than silently left as it is. `liger-kernel` is not a dependency of
this project: it pulls Triton, which only runs on GPUs (`pip install liger-kernel` on the cluster).

Selective checkpointing recomputes every N-th block (`activation_checkpointing=2`: half of them): each
recomputed block costs one extra forward of it, each other block keeps its activations.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import PreTrainedModel

from data.config import ConfigError
from pruning.layers import find_decoder_layers


def check_kernels(kernels: str, device: torch.device, zero_stage: int) -> None:
    """Refuse, before launch, Liger where it cannot run: no package, no GPU, or ZeRO-3, whose partitioned
    lm_head.weight Liger's fused loss reads directly, outside lm_head's forward where DeepSpeed would gather it
    (linkedin/Liger-Kernel#1048)."""
    if kernels == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("kernels=liger needs the liger-kernel package (pip install liger-kernel, on a GPU "
                              "machine: it brings Triton); or set kernels=none")
        if device.type != "cuda":
            raise ConfigError("kernels=liger runs Triton kernels, which need a CUDA GPU: set kernels=none on the CPU")
        if zero_stage == 3:
            raise ConfigError("kernels=liger cannot run under zero_stage=3: its fused loss reads lm_head.weight, which "
                              "ZeRO-3 partitions, outside lm_head's forward where DeepSpeed gathers it: use zero_stage=2 "
                              "(or 1), or kernels=none")


def apply_liger(model: PreTrainedModel) -> None:
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"Liger has no kernels for model type {model.config.model_type!r}: set kernels=none")
    _apply_liger_kernel_to_instance(model=model)


def speed_up(model: PreTrainedModel, kernels: str, compile_blocks: bool, checkpointing: bool | int) -> None:
    """Apply the options in place (Liger first: compile and checkpointing then wrap the fused blocks).
    `checkpointing`: true recomputes every block in backward, an integer N every N-th block."""
    if kernels == "liger":
        apply_liger(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=int(checkpointing))
    if compile_blocks:
        for block in find_decoder_layers(model)[1]:
            block.compile()
