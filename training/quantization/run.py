"""The quantization stage: GPTQ of a checkpoint into a 4-bit one that `from_pretrained` loads.

Everything that can fail cheaply (config, output path, library, model, calibration text) is checked
before any weights are loaded; the checkpoint is written under a temporary name, reloaded through
transformers and checked (every linear layer of every block is a GPTQ layer, no weight missing,
finite perplexity), then renamed into place with its report and resolved config.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data.artifacts import (
    atomic_directory,
    check_output_dir,
    directory_fingerprint,
    file_sha256,
    library_versions,
    write_json_atomic,
)
from data.config import ConfigError, save_config, to_dict
from data.embedded import resolve_model, resolve_text
from data.model_code import check_trust_remote_code
from data.precision import resolve_device, resolve_precision, torch_dtype
from data.text import load_documents
from pruning.calibration import sample_calibration, sample_concatenated
from pruning.layers import find_decoder_layers
from pruning.scores import calibration_perplexity
from training.quantization import gptq
from training.quantization.config import CalibrationSection, QuantizeConfig
from training.quantization.sizes import compare_sizes

PPL_WINDOWS = 8  # calibration windows scored before and after: a sanity figure; held-out PPL is launch/eval.py's


@dataclass
class QuantizeResult:
    output_dir: Path
    report: dict

    def lines(self) -> list[str]:
        sizes, layers = self.report["sizes"], self.report["sizes"]["quantized_layers"]
        ppl = self.report["calibration_ppl"]
        return [f"{layers['count']} linear layers to {self.report['settings']['bits']}-bit GPTQ "
                f"({layers['bits_per_weight_after']:.2f} bits per weight with scales and zeros): "
                f"{layers['bytes_before'] / 1e6:,.1f} MB -> {layers['bytes_after'] / 1e6:,.1f} MB",
                f"checkpoint on disk: {sizes['before']['disk_bytes'] / 1e6:,.1f} MB -> "
                f"{sizes['after']['disk_bytes'] / 1e6:,.1f} MB",
                f"calibration PPL ({ppl['windows']} windows): {ppl['before']:.2f} -> {ppl['after']:.2f}",
                f"checkpoint: {self.output_dir}",
                f"report:     {self.output_dir / 'quantization_report.json'}"]


def block_linears(model_config, trust_remote_code: bool) -> dict[str, int]:
    """Name -> input width of every Linear layer inside the decoder blocks (what GPTQ quantizes), from the
    model's config alone: the structure is built on the meta device, no weight is read."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    path, layers = find_decoder_layers(skeleton)
    return {f"{path}.{i}.{name}": module.in_features for i, block in enumerate(layers)
            for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def check_group_size(linears: dict[str, int], group_size: int) -> None:
    """The int4 kernels that run GPTQ checkpoints (GPTQModel's CPU kernel, Marlin on the GPU) need whole
    groups: a group size must divide every layer's input width (SmolLM2's 576 is 4.5 groups of 128)."""
    ragged = {name: width for name, width in linears.items() if group_size != -1 and width % group_size}
    if ragged:
        name, width = next(iter(ragged.items()))
        fits = next((g for g in (128, 64, 32, 16) if all(w % g == 0 for w in linears.values())), -1)
        raise ConfigError(f"group_size={group_size} does not divide the input width {width} of {name} (and "
                          f"{len(ragged) - 1} more layers): the int4 kernels that load GPTQ checkpoints need whole "
                          f"groups. Use group_size={fits}, which divides every layer")


def local_checkpoint(model: str) -> Path:
    """The checkpoint directory (a hub name is fetched into the HF cache); refuses what is not one."""
    path = Path(resolve_model(model)).expanduser()
    if not path.exists() and not model.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model))
        except Exception as err:  # offline, unknown repo, no access: all the same to the user
            raise ConfigError(f"model {model!r} is neither a local checkpoint directory nor a hub model that can be "
                              f"fetched here ({type(err).__name__}): give the directory written by launch/prune.py, "
                              "launch/cpt.py (exports/) or launch/lora.py (merged/)") from err
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {model}: {path} is not a Hugging Face checkpoint directory (no config.json); give "
                          "the directory written by launch/prune.py, launch/cpt.py (exports/) or launch/lora.py "
                          "(merged/)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model {model}: {path} holds no .safetensors weights (save it with "
                          "safe_serialization=True, as every stage here does)")
    return path


def draw_calibration(documents: list[str], tokenizer, cal: CalibrationSection) -> torch.Tensor:
    if cal.sampler == "concat":
        return sample_concatenated(documents, tokenizer, cal.num_samples, cal.seq_len, cal.seed, cal.bos, cal.max_rows)
    return sample_calibration(documents, tokenizer, cal.num_samples, cal.seq_len, cal.seed, cal.bos)


def _perplexity(path: Path, calibration: torch.Tensor, config: QuantizeConfig, device: torch.device,
                dtype: torch.dtype, expect_gptq: int | None = None) -> float:
    """Calibration perplexity of a checkpoint loaded as users load it; with `expect_gptq`, the checkpoint
    must also load whole with that many GPTQ layers (every Linear of the blocks)."""
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device),
                                                       trust_remote_code=config.trust_remote_code,
                                                       output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    gptq_layers = sum(hasattr(m, "qweight") for m in model.modules())
    if problems or (expect_gptq is not None and gptq_layers != expect_gptq):
        raise RuntimeError(f"{path} does not reload as a complete GPTQ checkpoint: {gptq_layers} GPTQ layers of "
                           f"{expect_gptq} expected, {problems or 'no missing weights'}")
    with torch.no_grad():
        ppl = calibration_perplexity(model.eval(), calibration[:PPL_WINDOWS].to(device),
                                     config.calibration.batch_size)
    if not math.isfinite(ppl):
        raise RuntimeError(f"{path} gives a non-finite calibration perplexity ({ppl})")
    return ppl


def calibration_fingerprint(calibration: torch.Tensor) -> str:
    return hashlib.sha256(calibration.to(torch.int64).numpy().tobytes()).hexdigest()


def quantize(config: QuantizeConfig) -> QuantizeResult:
    start = time.perf_counter()
    check_output_dir(config.output_dir, config.overwrite)
    versions = {**library_versions(), **gptq.library_versions()}
    model_path = local_checkpoint(config.model)
    check_trust_remote_code(model_path, config.trust_remote_code)
    linears = block_linears(AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code),
                            config.trust_remote_code)
    check_group_size(linears, config.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    cal = config.calibration
    documents = load_documents(cal.source, cal.text_field, cal.split, cal.subset, keep_empty=True)
    calibration = draw_calibration(documents, tokenizer, cal)
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    dtype = torch_dtype(precision)
    timings = {"setup_s": time.perf_counter() - start}

    tick = time.perf_counter()
    ppl_before = _perplexity(model_path, calibration, config, device, dtype)
    timings["ppl_before_s"] = time.perf_counter() - tick
    with atomic_directory(config.output_dir, config.overwrite) as tmp:
        timings.update(gptq.quantize_checkpoint(str(model_path), calibration, config, device, dtype, tmp))
        tick = time.perf_counter()
        ppl_after = _perplexity(tmp, calibration, config, device, dtype, expect_gptq=len(linears))
        timings["verify_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - start
        report = {
            "model": config.model,
            "library": {"quantizer": f"gptqmodel {versions['gptqmodel']}",
                        "loader": f"transformers {versions['transformers']} GPTQ integration (optimum "
                                  f"{versions['optimum']} + gptqmodel {versions['gptqmodel']})"},
            "settings": gptq.gptq_settings(config),
            "dtype": precision,
            "device": str(device),
            "calibration": {**to_dict(cal), "tokens": calibration.numel(),
                            "fingerprint": calibration_fingerprint(calibration)},
            "calibration_ppl": {"windows": min(PPL_WINDOWS, len(calibration)), "before": ppl_before,
                                "after": ppl_after},
            "sizes": compare_sizes(model_path, tmp),
            "timings": timings,
            "versions": versions,
            "fingerprints": {"model": directory_fingerprint(model_path), "output": directory_fingerprint(tmp),
                             "calibration_source": _source_fingerprint(cal.source)},
        }
        write_json_atomic(tmp / "quantization_report.json", report)
        save_config(config, tmp / "quantization_config.yaml")
    return QuantizeResult(Path(config.output_dir), report)


def _source_fingerprint(source: str) -> str | None:
    path = Path(resolve_text(source))
    return file_sha256(path) if path.is_file() else None
