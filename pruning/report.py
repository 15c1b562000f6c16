"""The pruning report's picture: the paper's Figure 4, score per block with removed blocks marked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

LOWER_IS_LESS_IMPORTANT = {
    "ppl": "calibration PPL without it",
    "taylor": "Taylor importance",
    "mag": "weight magnitude",
    "block_influence": "block influence (1 - cos)",
}


def plot_block_importance(scores: Sequence[float], removed: Sequence[int], protected: Sequence[int],
                          criterion: str, model_name: str, path: Path, labels: Sequence[str], unit: str = "block",
                          xlabel: str = "block index") -> None:
    """Bars of `scores` (one per block, or per module), each under its label (a block's index in the original
    model, or block.attn / block.mlp), removed ones in red, protected in gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = criterion.rstrip("+")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(scores)), 3.6), dpi=120)
    colors = ["tab:red" if i in removed else "tab:gray" if i in protected else "tab:blue"
              for i in range(len(scores))]
    values = [0.0 if math.isnan(s) else s for s in scores]
    ax.bar(range(len(scores)), values, color=colors)
    if base == "ppl":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LOWER_IS_LESS_IMPORTANT.get(base, "importance"))
    ax.set_title(f"{model_name}: {unit} importance by {criterion} (red: removed, gray: protected)", fontsize=9)
    ax.set_xticks(range(len(scores)), labels=list(labels))
    ax.tick_params(axis="x", labelsize=7, rotation=0 if unit == "block" else 90)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
