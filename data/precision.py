"""One precision vocabulary for every stage: `auto | bf16 | fp16 | fp32`, and where `auto` is resolved.

Configs spell precisions with these names only (pruning's `dtype`, training's `precision`, the
evaluation's and the export's `dtype`); `auto` means bf16 on a CUDA device and fp32 on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # configs import this module: it must not import torch (`--help` stays instant)
    import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISION_DOC = "auto = bf16 on GPU, fp32 on CPU; or bf16, fp16, fp32"


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete name (`bf16`, `fp16`, `fp32`) for a device."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def torch_dtype(precision: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a precision name; `auto` needs the device it runs on."""
    import torch

    if precision == "auto":
        if device is None:
            raise ValueError("precision 'auto' needs a device to resolve against")
        precision = resolve_precision(precision, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]

