"""Depth-prune a Hugging Face decoder: score every block, remove the least important in one shot.

  python launch/prune.py --config configs/prune/smollm2_ppl_20.yaml [key=value ...]
  python launch/prune.py --config configs/prune/paper/llama7b_ppl_20.yaml dry_run=true   # the plan only

Writes a plain HF checkpoint plus pruning_report.json and block_importance.png to output_dir.
"""

from __future__ import annotations

import sys

from data.cli import cli_config, run_main
from pruning.config import PruneConfig


def main(argv: list[str]) -> int:
    config = cli_config(PruneConfig, __doc__, argv)
    from pruning.run import dry_run, prune

    if config.dry_run:
        print("\n".join(dry_run(config).lines()))
        return 0
    result = prune(config)
    report = result.report
    if report["unit"] == "module":
        print(f"criterion {report['criterion']}: removed modules {report['removed_modules']}")
    renumbered = report["removed_original"] != result.removed  # the input was pruned before
    print(f"criterion {report['criterion']}: removed blocks {report['removed_original']}"
          + (f" of the original {report['original_model']} ({result.removed} in this checkpoint's numbering)"
             if renumbered else "")
          + f" ({report['num_blocks_before']} -> {report['num_blocks_after']} blocks, "
          f"{report['params_before'] / 1e6:.1f}M -> {report['params_after'] / 1e6:.1f}M parameters, "
          f"-{report['param_reduction']:.1%})")
    print(f"calibration PPL {report['calibration_ppl_before']:.2f} -> {report['calibration_ppl_after']:.2f}")
    print("\n".join(result.artifact_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
