"""Draw training curves of one or several runs into one PNG, overlaid with their names.

  python launch/plot.py RUN [RUN ...] [x=tokens] [names=[cpt,distilled]] [output=compare.png]

RUN is a run directory of launch/cpt.py or launch/lora.py (its output_dir, holding metrics.jsonl).
Panels: training loss, held-out loss (per held-out set where logged), learning rate, tokens/s,
zero-shot accuracy and gradient norm, against steps (default) or tokens. Training draws
<output_dir>/curves.png by itself when a launch ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data.cli import cli_config, run_main
from training.curves import PlotConfig, plot_runs


def main(argv: list[str]) -> int:
    positional = [a for a in argv if "=" not in a and not a.startswith("-")]  # RUN ... before key=value
    config = cli_config(PlotConfig, __doc__, [a for a in argv if a not in positional])
    config.runs = [*config.runs, *map(Path, positional)]
    if not config.runs:
        print("error: give at least one run directory: python launch/plot.py RUN [RUN ...]", file=sys.stderr)
        return 2
    config.validate()
    output = config.output_path()
    plot_runs(config.runs, output, config.names or None, config.x)
    print(f"curves of {len(config.runs)} run(s): {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
