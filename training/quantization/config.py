"""Typed configuration of the quantization stage (see configs/quantize/): torch-free, so `--help` is instant.

The defaults are the official repository's GPTQ run (shortened-llm src/quantize_gptq.py: AutoGPTQ
`BaseQuantizeConfig(bits=4, group_size=128, desc_act=True)` with AutoGPTQ 0.7's other defaults, and
128 windows of 2048 tokens of C4 drawn with seed 0). Keys that the official code does not have are
named switches, documented in README "Quantization".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import ConfigError
from data.precision import PRECISION_DOC, Precision
from pruning.config import CalibrationSection as PruningCalibration

GPTQ_BITS = (2, 3, 4, 8)  # the widths the GPTQ checkpoint format packs into int32


@dataclass
class CalibrationSection(PruningCalibration):
    """Pruning's calibration keys with the official GPTQ script's defaults, plus its sampler."""

    source: str = "embedded:c4_demo.jsonl"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 1
    sampler: Literal["concat", "rows"] = "concat"
    max_rows: int = 5000

    __field_docs__ = {
        **PruningCalibration.__field_docs__,
        "source": ".txt/.jsonl/.jsonl.zst/.json file, embedded:NAME, or a Hugging Face dataset name (the paper: "
                  "C4; offline, the embedded 300-document C4 sample)",
        "batch_size": "calibration samples per forward pass while GPTQ collects its statistics (official: 1)",
        "sampler": "concat = the official GPTQ script's: windows of the first max_rows rows joined by blank "
                   "lines; rows = pruning's sampler: one window inside each of num_samples distinct long rows",
        "max_rows": "concat: how many rows are joined (official: 5000)",
    }

    def validate(self) -> None:
        super().validate()
        if self.max_rows < 1:
            raise ConfigError("calibration.max_rows must be at least 1")


@dataclass
class QuantizeConfig:
    model: str = "embedded:smollm2-135m"
    output_dir: Path = Path("outputs/quantized")
    overwrite: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: Precision = "auto"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = True
    sym: bool = True
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    calibration: CalibrationSection = field(default_factory=CalibrationSection)

    __field_docs__ = {
        "model": "HF checkpoint directory (pruned, CPT export, merged LoRA) or hub name, or embedded:smollm2-135m",
        "trust_remote_code": "let transformers run the checkpoint's own modeling code (module-pruned checkpoints)",
        "device": "auto | cpu | cuda | cuda:N: where GPTQ runs",
        "dtype": PRECISION_DOC + "; the weights GPTQ starts from and the precision of the layers it leaves "
                 "unquantized (the official run: fp16 on the GPU)",
        "bits": f"weight bits, one of {', '.join(map(str, GPTQ_BITS))} (the paper: 4)",
        "group_size": "input columns sharing one scale and zero point; -1 = one per output row (the paper: 128)",
        "desc_act": "quantize columns by decreasing activation size (act-order), groups in that order",
        "sym": "symmetric quantization (zero point fixed at the middle of the range)",
        "damp_percent": "Hessian dampening, as a fraction of its mean diagonal",
        "damp_auto_increment": "ours (GPTQModel's default): raise the dampening by this step while the Hessian is "
                               "not positive definite; AutoGPTQ, which the official code used, stops with an "
                               "error there (0 = no retries)",
        "true_sequential": "quantize a block's projections in order, each seeing the ones before it quantized",
        "static_groups": "fix every group's scale before act-order (AutoGPTQ's static_groups)",
    }

    def validate(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise ConfigError(f"bits={self.bits}: GPTQ checkpoints hold {', '.join(map(str, GPTQ_BITS))}-bit weights")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size}: use a positive number of columns (128) or -1 "
                              "(one group per output row)")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent={self.damp_percent} must be between 0 and 1 (official: 0.01)")
        if self.damp_auto_increment < 0:
            raise ConfigError("damp_auto_increment must be 0 (no retries) or more")
