"""Export a committed training checkpoint as a Hugging Face checkpoint (safetensors).

  python launch/export.py checkpoint=outputs/cpt/checkpoints/step_00001000 output_dir=outputs/cpt-1000

Works for any ZeRO stage and any world size, on one CPU process; the result loads with plain
`AutoModelForCausalLM.from_pretrained`. Training exports its final step by itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data.artifacts import check_output_dir
from data.cli import cli_config, run_main
from training.export import DTYPES, export_checkpoint


@dataclass
class ExportConfig:
    checkpoint: Path = Path("outputs/cpt/checkpoints/step_00001000")
    output_dir: Path = Path("outputs/cpt-export")
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    overwrite: bool = False

    __field_docs__ = {"checkpoint": "a committed checkpoint directory, <run>/checkpoints/step_N",
                      "dtype": "weights dtype of the export (training keeps fp32 master weights)"}


def main(argv: list[str]) -> int:
    config = cli_config(ExportConfig, __doc__, argv)
    check_output_dir(config.output_dir, config.overwrite)
    output = export_checkpoint(config.checkpoint, config.output_dir, DTYPES[config.dtype])
    print(f"Hugging Face checkpoint: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
