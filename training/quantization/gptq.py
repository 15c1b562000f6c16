"""GPTQ through GPTQModel (ModelCloud), the maintained successor of AutoGPTQ, which the official code
used. It writes the same GPTQ checkpoint format (int4 `qweight` packed in int32, per-group `scales`,
`qzeros`, `g_idx`) that transformers loads through its GPTQ integration (optimum + gptqmodel), on the
CPU (an int4 matmul kernel) as on the GPU (Marlin, ExLlama, Triton kernels).

Only this module imports gptqmodel; everything else sees a config in and a checkpoint out.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from training.quantization.config import QuantizeConfig

LIBRARIES = ("gptqmodel", "optimum")  # quantizing needs the first; transformers needs both to load the output
INSTALL_HINT = ("make install, or: pip install -e '.[quantize]' && pip install --no-deps gptqmodel==7.6.0 "
                "(with PIP_CONSTRAINT=constraints.txt; the Makefile says why --no-deps)")


class QuantizationLibraryError(ValueError):
    """The quantization library is missing."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries the stage needs; an error naming the install command if one is missing."""
    missing = [name for name in LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise QuantizationLibraryError(f"GPTQ needs {' and '.join(missing)}, not installed here: {INSTALL_HINT}")
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _gptqmodel():
    # GPTQModel's thread pool asks for 2 CPU model-loader workers but grants the CPU pool only
    # (cores + 1) // 2: on a 2-core machine `quantize` fails ("requests 2 workers but parent 'cpu' only
    # has 1") unless the pool is sized explicitly, which must happen before the import.
    if (os.cpu_count() or 1) < 3:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


def gptq_settings(config: QuantizeConfig) -> dict:
    """The GPTQ settings as GPTQModel's QuantizeConfig takes them (and as the report records them)."""
    return {"bits": config.bits, "group_size": config.group_size, "desc_act": config.desc_act, "sym": config.sym,
            "damp_percent": config.damp_percent, "damp_auto_increment": config.damp_auto_increment,
            "true_sequential": config.true_sequential, "static_groups": config.static_groups,
            # AutoGPTQ (the official code) had neither GPTQModel's group-aware reordering nor its
            # round-to-nearest fallback for modules that see little calibration data: both off.
            "act_group_aware": False, "fallback": None, "format": "gptq"}


@contextlib.contextmanager
def _module_log_outside_the_working_directory() -> Iterator[None]:
    """GPTQModel appends a JSON record per quantized module to `logs/` of the working directory (the
    relative `_PROJECT_LOG_DIR`); send it to a scratch directory instead: the checkpoint's own
    quant_log.csv holds the same per-module losses."""
    from gptqmodel.looper import loop_processor

    scratch = Path(tempfile.mkdtemp(prefix="shorten-gptq-log-"))
    default, loop_processor._PROJECT_LOG_DIR = loop_processor._PROJECT_LOG_DIR, scratch
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = default
        shutil.rmtree(scratch, ignore_errors=True)


def quantize_checkpoint(model_path: str, calibration: torch.Tensor, config: QuantizeConfig, device: torch.device,
                        dtype: torch.dtype, out_dir: Path) -> dict[str, float]:
    """Quantize `model_path` on `calibration` ([samples, seq_len] token ids) and save the GPTQ checkpoint
    (weights, config with its quantization_config, tokenizer) in `out_dir`; returns the timings."""
    gptqmodel = _gptqmodel()
    timings = {}
    tick = time.perf_counter()
    model = gptqmodel.GPTQModel.load(model_path, gptqmodel.QuantizeConfig(**gptq_settings(config)),
                                     device=str(device), dtype=dtype, trust_remote_code=config.trust_remote_code)
    timings["load_s"] = time.perf_counter() - tick
    examples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calibration]
    with _module_log_outside_the_working_directory():
        tick = time.perf_counter()
        # calibration_sort=None keeps the sampler's order (GPTQModel sorts by length by default; AutoGPTQ did not)
        model.quantize(examples, batch_size=config.calibration.batch_size, calibration_sort=None)
        timings["quantize_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        model.save(str(out_dir))
        timings["save_s"] = time.perf_counter() - tick
    return timings
