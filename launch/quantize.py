"""Quantize a checkpoint to 4-bit weights with GPTQ (the paper's section 5.3), loadable by from_pretrained.

  python launch/quantize.py --config configs/quantize/paper.yaml model=outputs/cpt/x/exports/step_00035286
  python launch/quantize.py --config configs/quantize/smollm2_demo.yaml model=outputs/demo/pruned

Writes the GPTQ checkpoint, quantization_report.json (library, settings, calibration fingerprint, sizes
before and after, timings) and quantization_config.yaml to output_dir. Loading it needs gptqmodel and
optimum (pip install -e '.[quantize]'); launch/eval.py evaluates it like any model.
"""

from __future__ import annotations

import sys

from data.cli import cli_config, run_main
from training.quantization.config import QuantizeConfig


def main(argv: list[str]) -> int:
    config = cli_config(QuantizeConfig, __doc__, argv)
    from training.quantization.run import quantize

    print("\n".join(quantize(config).lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
