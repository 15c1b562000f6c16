"""The efficiency study's pictures, from the latency grid of results.json.

- latency_throughput.png, like the paper's Figure 7: throughput against latency, one panel per output
  length L, one line per model with one marker per batch size M (labelled with M);
- latency_by_batch.png, like the bottom of Figure 2: latency against batch size, one panel per L.

The first model is the reference (the original, drawn in grey, as in the paper): a model's line is
dotted where the reference ran out of memory (or was not measured) and only that model runs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from training.evaluation.tables import ok  # noqa: E402

REFERENCE_COLOR = "0.55"


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if any(ok(c) for c in r.get("latency", []))]


def _lengths(rows: list[dict]) -> list[int]:
    return sorted({c["new_tokens"] for r in rows for c in r["latency"] if ok(c)})


def _panels(count: int, title: str) -> tuple[Figure, list]:
    figure, axes = plt.subplots(1, count, figsize=(4.8 * count, 4.2), squeeze=False)
    figure.suptitle(title)
    return figure, list(axes[0])


def _series(row: dict, reference: dict, new_tokens: int) -> tuple[list[dict], list[dict]]:
    """The model's measured cells at L by batch size: those the reference also ran, and those beyond it."""
    cells = sorted((c for c in row["latency"] if ok(c) and c["new_tokens"] == new_tokens),
                   key=lambda c: c["batch_size"])
    shared = {c["batch_size"] for c in reference["latency"] if ok(c) and c["new_tokens"] == new_tokens}
    return [c for c in cells if c["batch_size"] in shared], [c for c in cells if c["batch_size"] not in shared]


def _draw(ax, rows: list[dict], new_tokens: int, x_key: str, y_key: str, label_markers: bool) -> None:
    reference = rows[0]
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for row in rows:
        color = REFERENCE_COLOR if row is reference else next(colors)
        within, beyond = _series(row, reference, new_tokens)
        points = within + beyond
        if not points:
            continue
        if within:
            ax.plot([c[x_key] for c in within], [c[y_key] for c in within], "-", color=color)
        if beyond:
            tail = within[-1:] + beyond  # the dotted part starts at the last batch the reference ran
            ax.plot([c[x_key] for c in tail], [c[y_key] for c in tail], ":", color=color, linewidth=2)
        ax.plot([c[x_key] for c in points], [c[y_key] for c in points], linestyle="none", marker="o", color=color,
                label=row["name"])
        if label_markers:
            for c in points:
                ax.annotate(f"M={c['batch_size']}", (c[x_key], c[y_key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _per_length(rows: list[dict], title: str, x_key: str, y_key: str, xlabel: str, ylabel: str,
                label_markers: bool) -> Figure | None:
    """One panel per output length L, each model's cells drawn as `y_key` against `x_key`."""
    rows = _measured(rows)
    if not rows:
        return None
    lengths = _lengths(rows)
    figure, axes = _panels(len(lengths), title)
    for ax, new_tokens in zip(axes, lengths, strict=True):
        _draw(ax, rows, new_tokens, x_key, y_key, label_markers)
        ax.set(title=f"L = {new_tokens}", xlabel=xlabel, ylabel=ylabel)
    return figure


def latency_throughput_figure(rows: list[dict]) -> Figure | None:
    """Figure 7: throughput (tokens/s) against latency (s) per L; markers are batch sizes."""
    figure = _per_length(rows, "Latency-throughput trade-off (dotted: only this model fits)", "latency_s",
                         "tokens_per_s", "latency (s)", "throughput (tokens/s)", label_markers=True)
    if figure is not None:
        figure.tight_layout()
    return figure


def latency_by_batch_figure(rows: list[dict]) -> Figure | None:
    """Figure 2 (bottom): latency (s) against batch size M, one panel per L."""
    figure = _per_length(rows, "Latency by batch size (dotted: only this model fits)", "batch_size", "latency_s",
                         "batch size M", "latency (s)", label_markers=False)
    if figure is None:
        return None
    batch_sizes = sorted({c["batch_size"] for r in _measured(rows) for c in r["latency"] if ok(c)})
    for ax in figure.axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(m) for m in batch_sizes])
        ax.xaxis.set_minor_locator(NullLocator())
    figure.tight_layout()
    return figure


FIGURES = {"latency_throughput.png": latency_throughput_figure, "latency_by_batch.png": latency_by_batch_figure}


def write_plots(rows: list[dict], directory: Path) -> list[Path]:
    """The PNGs of the figures there is data for, written into `directory`."""
    written = []
    for name, build in FIGURES.items():
        figure = build(rows)
        if figure is not None:
            figure.savefig(directory / name, dpi=120)
            plt.close(figure)
            written.append(directory / name)
    return written
