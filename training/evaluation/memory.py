"""Peak memory of one latency cell, and running out of memory as a result instead of a crash.

On a GPU the peak is `torch.cuda.max_memory_allocated`, reset before each cell, as the official
`gen_batch_eval_vram.py` measures it (weights included). On a CPU it is the process's peak resident
set: Linux keeps it as VmHWM in /proc/self/status, and writing 5 to /proc/self/clear_refs resets it
to the current resident set. Freed heap memory that glibc still holds would count as resident, so
each reset first hands it back (`malloc_trim`); the peak of a cell is then its own, not the
process-lifetime peak that `ru_maxrss` reports. Elsewhere (no /proc) the CPU peak is not measured.

A memory limit makes out-of-memory testable and reproducible: on a GPU it caps the caching
allocator (`set_per_process_memory_fraction`, so a real `torch.OutOfMemoryError` is raised, as on
a smaller card); on a CPU a cell whose lower-bound estimate (resident memory + the KV cache it must
hold) or whose measured peak exceeds the limit raises the same `torch.OutOfMemoryError`. A CPU has no recoverable
out-of-memory error of its own: the kernel kills the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from data.config import ConfigError

GIB = 2**30
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: hand freed heap pages back to the OS

# what the peak means, as results.json and the tables name it
GPU_ALLOCATED = "peak GPU memory allocated"
CPU_RESIDENT = "peak resident memory of the process"


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1))


def _resettable_peak_rss() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, AttributeError):
        return False
    return True


class MemoryMeter:
    """Resets, reads and checks the peak memory of the device a model runs on."""

    def __init__(self, device: torch.device, limit_gb: float | None = None):
        self.device, self.limit_gb = device, limit_gb
        self.limit = None if limit_gb is None else int(limit_gb * GIB)
        if device.type == "cuda":
            self.kind = GPU_ALLOCATED
        else:
            self.kind = CPU_RESIDENT if _resettable_peak_rss() else None
            if self.kind is None and limit_gb is not None:
                raise ConfigError("latency.memory_limit_gb on a CPU needs a per-cell peak of the resident memory, "
                                  "which only Linux's /proc/self/clear_refs gives: unset it here")

    def reset(self) -> None:
        """Start a new peak from what is in use now."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind is not None:
            if MALLOC_TRIM is not None:
                MALLOC_TRIM(0)
            CLEAR_REFS.write_text("5")

    def release(self) -> None:
        """Free what a failed run left behind (its tensors live in reference cycles through the traceback)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def current(self) -> int | None:
        """Bytes in use now: allocated on the GPU, resident on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024 if self.kind is not None else None

    def peak(self) -> int | None:
        """The highest use since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024 if self.kind is not None else None

    def check(self, needed: int = 0) -> None:
        """torch.OutOfMemoryError, as a GPU raises it, if the peak since the reset, or what is in use now
        plus the `needed` bytes still to come, exceeds the limit."""
        if self.limit is None:
            return
        peak = self.peak() or 0
        if peak > self.limit:
            raise torch.OutOfMemoryError(f"peak {peak / GIB:.2f} GiB over the limit of {self.limit_gb} GiB")
        current = self.current() or 0
        if needed and current + needed > self.limit:
            raise torch.OutOfMemoryError(f"needs at least {(current + needed) / GIB:.2f} GiB (in use "
                                         f"{current / GIB:.2f} + KV cache {needed / GIB:.2f}), limit "
                                         f"{self.limit_gb} GiB")

    @contextlib.contextmanager
    def limited(self) -> Iterator[MemoryMeter]:
        """On a GPU, cap the allocator at the limit for the duration (a real OOM beyond it)."""
        if self.device.type != "cuda" or self.limit is None:
            yield self
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit / total), self.device)
        try:
            yield self
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


def kv_cache_bytes(config, batch_size: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes the KV cache holds after `tokens` positions: keys and values of every full-attention layer.

    A lower bound on what generation needs beyond the weights (sliding-window layers, activations and
    logits are left out), so a cell it rules out could never have fit.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    if not heads or not getattr(config, "num_hidden_layers", None):
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    full_layers = sum(1 for kind in layer_types if kind != "sliding_attention")
    return 2 * full_layers * batch_size * tokens * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
