"""Export a committed training checkpoint (CPT or LoRA) as a Hugging Face checkpoint (safetensors).

  python launch/export.py checkpoint=outputs/cpt/checkpoints/step_00001000 output_dir=outputs/cpt-1000

Works for any ZeRO stage and any world size, on one CPU process; the result loads with plain
`AutoModelForCausalLM.from_pretrained`. A LoRA checkpoint is merged into its base model. Training
exports its final step by itself.
"""

from __future__ import annotations

import sys

from data.artifacts import check_output_dir
from data.cli import cli_config, run_main
from training.config import ExportConfig


def main(argv: list[str]) -> int:
    config = cli_config(ExportConfig, __doc__, argv)
    check_output_dir(config.output_dir, config.overwrite)
    from data.precision import torch_dtype
    from training.export import export_checkpoint

    output = export_checkpoint(config.checkpoint, config.output_dir, torch_dtype(config.dtype), config.trust_remote_code)
    print(f"Hugging Face checkpoint: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
