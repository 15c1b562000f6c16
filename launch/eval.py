"""Evaluate models as the paper does: lm-eval zero-shot, WikiText-2/PTB perplexity, generation speed.

  python launch/eval.py --config configs/eval/paper.yaml model=outputs/cpt/x/exports/step_00035286
  python launch/eval.py --config configs/eval/paper.yaml models='[{name: original, path: lmsys/vicuna-7b-v1.3},
      {name: pruned, path: outputs/vicuna7b_ppl_20}]'
  python launch/eval.py compare='[outputs/eval-a/results.json, outputs/eval-b/results.json]' output_dir=outputs/table

  python launch/eval.py --config configs/eval/paper_efficiency.yaml models='[...]'   # the M x L grid, OOM frontier

Writes results.json (per model: fingerprint, parameters, every score, every latency/memory cell; the
settings and library versions), results.md (the models side by side: the main table, the latency and
memory grids, the largest batch per L, the samples) and the plots (latency_throughput.png,
latency_by_batch.png) to output_dir.
"""

from __future__ import annotations

import sys

from data.cli import cli_config, run_main
from training.evaluation.config import EvalConfig


def main(argv: list[str]) -> int:
    config = cli_config(EvalConfig, __doc__, argv)
    from training.evaluation.run import evaluate_models

    output = evaluate_models(config)
    print((output / "results.md").read_text())
    print(f"results: {output / 'results.json'}")
    for plot in sorted(output.glob("*.png")):
        print(f"plot:    {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
