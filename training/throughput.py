"""Model FLOPs per token and model FLOPs utilisation (MFU), as PaLM (appendix B) defines them.

Training FLOPs per token = 6 N + 12 L d s, where N is the number of parameters that take part in a
matrix multiply (every nn.Linear, the LM head included, embeddings' lookups not), L the number of
blocks, d the hidden size and s the sequence length (attention scores and weighted sums, forward
and backward). Activation recomputation is not counted: MFU measures useful work. MFU = achieved
model FLOP/s per device / the device's dense peak in the training precision (bf16 and fp16 share one peak;
fp32 runs on tf32 tensor cores at half of it).
"""

from __future__ import annotations

import resource

import torch
from torch import nn

# Dense bf16 (= fp16) peak TFLOP/s per device (tensor cores, no sparsity: half NVIDIA's "with sparsity" figures),
# matched against torch.cuda.get_device_name in this order, so the PCIe and NVL boards (lower clocks and
# power) are found before the SXM parts whose names are their prefix ("NVIDIA H100 80GB HBM3" is SXM).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5),
    ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4),  # SXM
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("B200", 2250.0), ("MI300X", 1307.4),
)


def device_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device by its CUDA name, or None when unknown."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def matmul_parameters(model: nn.Module) -> int:
    """Weights of every nn.Linear (ZeRO-3 partitions report their full size via ds_numel)."""
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    config = model.config
    skipped = getattr(config, "skipped_sublayers", None) or []  # layers a module-pruned model left without attention
    attention_layers = config.num_hidden_layers - sum("attn" in units for units in skipped)
    return 6.0 * matmul_parameters(model) + 12.0 * attention_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU without an override): no MFU then."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = device_peak_tflops(torch.cuda.get_device_name(device))
    if tflops is None:
        return None
    return tflops * 1e12 if precision in ("bf16", "fp16") else tflops * 1e12 / 2  # fp16 = bf16; fp32 runs on tf32


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
