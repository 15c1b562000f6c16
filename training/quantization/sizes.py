"""What a checkpoint weighs: bytes on disk, and tensor bytes read from the safetensors headers (nothing
is loaded), in all and for the linear layers GPTQ replaced."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")  # what a GPTQ layer stores for its weight


class Tensor(NamedTuple):
    nbytes: int
    elements: int


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}: the file's JSON header (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def stored_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, meta in safetensors_header(file).items():
            start, end = meta["data_offsets"]
            tensors[name] = Tensor(end - start, math.prod(meta["shape"]))
    return tensors


def checkpoint_sizes(path: Path) -> dict[str, int]:
    """Bytes on disk of every file (weights, config, tokenizer) and bytes of the stored tensors."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return {"disk_bytes": sum(f.stat().st_size for f in files),
            "weight_bytes": sum(t.nbytes for t in stored_tensors(path).values())}


def compare_sizes(before: Path, after: Path) -> dict:
    """Both checkpoints' sizes, and the quantized layers alone: their weight and bias before; qweight, qzeros,
    scales, g_idx and bias after, also as bits stored per original weight (4-bit, group 128, fp16 scales: ~4.2)."""
    tensors_before, tensors_after = stored_tensors(before), stored_tensors(after)
    layers = sorted(name.removesuffix(".qweight") for name in tensors_after if name.endswith(".qweight"))

    def total(tensors: dict[str, Tensor], suffixes: tuple[str, ...]) -> int:
        return sum(tensors[f"{layer}.{s}"].nbytes for layer in layers for s in suffixes if f"{layer}.{s}" in tensors)

    elements = sum(tensors_before[f"{layer}.weight"].elements for layer in layers if f"{layer}.weight" in tensors_before)
    after_bytes = total(tensors_after, GPTQ_TENSORS)
    return {"before": checkpoint_sizes(before), "after": checkpoint_sizes(after),
            "quantized_layers": {"count": len(layers), "weights": elements,
                                 "bytes_before": total(tensors_before, ("weight", "bias")), "bytes_after": after_bytes,
                                 "bits_per_weight_after": 8 * after_bytes / elements if elements else None}}
