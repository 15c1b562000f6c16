"""Training curves as one picture: several runs' metrics.jsonl overlaid, against steps or tokens.

  plot_runs([run_dir, ...], output, names=None, x="steps") -> matplotlib Figure, saved as a PNG

Six panels: training loss, held-out loss (`val.loss`, and `val.loss.<set>` per held-out set where a
run logs them), learning rate, tokens/s, zero-shot accuracy (`zeroshot.average`, lm-eval's tasks
averaged) and gradient norm. One colour per run, labelled with its name; a panel no run logged says so.
The trainer draws <output_dir>/curves.png when a launch ends; `launch/plot.py` compares runs (plain CPT
against distillation, say). Torch-free; matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import ConfigError

PANELS = (("train.loss", "training loss"), ("val.loss", "held-out loss"), ("train.lr", "learning rate"),
          ("perf.tokens_per_s", "tokens/s"), ("zeroshot.average", "zero-shot accuracy (task average)"),
          ("train.grad_norm", "gradient norm"))
LINE_STYLES = ("-", "--", ":", "-.")  # a run's held-out sets: the overall val.loss solid, then one style per set


@dataclass
class PlotConfig:
    runs: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    x: Literal["steps", "tokens"] = "steps"
    output: Path | None = None

    __field_docs__ = {
        "runs": "run directories (each holds metrics.jsonl); also given as positional arguments",
        "names": "legend names, one per run (default: the run directories' names)",
        "x": "the horizontal axis: optimizer steps, or training tokens (train.tokens)",
        "output": "the PNG (default: <run>/curves.png for one run, curves.png here for several)",
    }

    def validate(self) -> None:
        if self.names and len(self.names) != len(self.runs):
            raise ConfigError(f"names has {len(self.names)} entries for {len(self.runs)} runs: give one per run")
        for run in self.runs:
            if not (Path(run) / "metrics.jsonl").is_file():
                raise ConfigError(f"{run} has no metrics.jsonl: give run directories of launch/cpt.py or "
                                  "launch/lora.py (their output_dir)")

    def output_path(self) -> Path:
        if self.output is not None:
            return self.output
        return Path(self.runs[0]) / "curves.png" if len(self.runs) == 1 else Path("curves.png")


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records (a last line cut short by a killed run is skipped)."""
    records = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, y) of every record holding `key`; x is the step or the tokens trained by that step."""
    tokens = {0: 0, **{r["step"]: r["train.tokens"] for r in records if "train.tokens" in r}}
    points = [(r["step"] if x == "steps" else tokens.get(r["step"]), r[key]) for r in records if key in r]
    points = sorted((px, py) for px, py in points if px is not None)
    return [px for px, _ in points], [py for _, py in points]


def held_out_keys(records: list[dict]) -> list[str]:
    """val.loss first, then val.loss.<set> per held-out set, in name order."""
    keys = {k for r in records for k in r if k == "val.loss" or k.startswith("val.loss.")}
    return sorted(keys, key=lambda k: (k != "val.loss", k))


def run_names(runs: Sequence[Path]) -> list[str]:
    """Each run's directory name; parent/name where two runs share a name."""
    names = [Path(run).resolve().name for run in runs]
    return [f"{Path(run).resolve().parent.name}/{name}" if names.count(name) > 1 else name
            for run, name in zip(runs, names, strict=True)]


def draw(runs: Sequence[tuple[str, list[dict]]], x: str = "steps"):
    """The figure (matplotlib's object API: no pyplot state, no display needed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 9), layout="constrained")
    axes = figure.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step" if x == "steps" else "tokens")
        for index, (name, records) in enumerate(runs):
            keys = held_out_keys(records) if key == "val.loss" else [key]
            for number, metric in enumerate(keys):
                xs, ys = series(records, metric, x)
                if not xs:
                    continue
                style = LINE_STYLES[number % len(LINE_STYLES)]
                label = name if metric == key else f"{name}: {metric.removeprefix('val.loss.')}"
                sparse = not metric.startswith(("train.", "perf."))  # evaluations: a few points, marked
                ax.plot(xs, ys, style, color=f"C{index % 10}", label=label, marker="o" if sparse else None,
                        markersize=3, linewidth=1.2)
        if ax.lines:
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return figure


def plot_runs(runs: Sequence[Path], output: Path, names: Sequence[str] | None = None, x: str = "steps"):
    """Draw the runs' curves into `output` (PNG, written atomically); returns the figure."""
    figure = draw(list(zip(names or run_names(runs), (read_metrics(run) for run in runs), strict=True)), x)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    figure.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, output)
    return figure
