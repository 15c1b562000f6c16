"""The inference-efficiency study: latency, throughput and peak memory over batch size M x output
length L (the paper's Figures 2 and 7, Tables 8 and 13), and the largest batch that fits per L.

A cell that runs out of memory is recorded as such (status "oom") and the study goes on; at the same
L every larger batch is then recorded as out of memory without being run, since it needs more.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.evaluation.config import LatencySection
from training.evaluation.latency import measure_generation
from training.evaluation.memory import MemoryMeter


def measure_cell(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, section: LatencySection,
                 meter: MemoryMeter, batch_size: int, new_tokens: int, warmup: int, runs: int) -> dict:
    return measure_generation(model, tokenizer, batch_size, section.input_tokens, new_tokens, warmup, runs,
                              prompt=section.prompt, sampling=section.sampling, meter=meter)


def latency_grid(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, section: LatencySection,
                 meter: MemoryMeter) -> list[dict]:
    """One cell per (M, L), batch sizes in increasing order at each L."""
    cells = []
    pairs = [(m, n) for n in section.new_tokens for m in sorted(section.batch_sizes)]
    failed_at: dict[int, int] = {}
    for batch_size, new_tokens in tqdm(pairs, desc="latency grid", leave=False):
        if new_tokens in failed_at:
            cells.append({"batch_size": batch_size, "new_tokens": new_tokens, "status": "oom",
                          "oom": f"not run: batch {failed_at[new_tokens]} already ran out of memory"})
            continue
        cell = measure_cell(model, tokenizer, section, meter, batch_size, new_tokens, section.warmup, section.runs)
        if cell["status"] == "oom":
            failed_at[new_tokens] = batch_size
        cells.append(cell)
    return cells


def largest_batch(fits: Callable[[int], bool], known_fit: int = 0, known_oom: int | None = None,
                  cap: int = 1024) -> dict:
    """The largest batch size for which `fits` holds, by doubling from `known_fit` and then bisecting.

    `known_fit`/`known_oom` are what the grid already saw (0/None: nothing); memory grows with the
    batch, so everything at or above a failing batch fails. Returns max_batch (0: not even one fits),
    first_oom (None when the search stopped at `cap`), capped, and the probes in the order run.
    """
    low, high, probes = known_fit, known_oom, []

    def probe(batch_size: int) -> bool:
        ok = fits(batch_size)
        probes.append([batch_size, "ok" if ok else "oom"])
        return ok

    while high is None:
        if low >= cap:
            return {"max_batch": low, "first_oom": None, "capped": True, "probes": probes}
        candidate = min(cap, max(1, 2 * low))
        if probe(candidate):
            low = candidate
        else:
            high = candidate
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return {"max_batch": low, "first_oom": high, "capped": False, "probes": probes}


def batch_frontier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, section: LatencySection,
                   meter: MemoryMeter, cells: list[dict]) -> list[dict]:
    """The largest batch that fits at each L, starting from what the grid found; one generation per probe."""
    frontier = []
    for new_tokens in tqdm(section.new_tokens, desc="largest batch", leave=False):
        here = [c for c in cells if c["new_tokens"] == new_tokens]
        known_fit = max((c["batch_size"] for c in here if c["status"] == "ok"), default=0)
        known_oom = min((c["batch_size"] for c in here if c["status"] == "oom"), default=None)

        def fits(batch_size: int, new_tokens: int = new_tokens) -> bool:
            cell = measure_cell(model, tokenizer, section, meter, batch_size, new_tokens, warmup=0, runs=1)
            return cell["status"] == "ok"

        found = largest_batch(fits, known_fit, known_oom, section.max_batch_cap)
        frontier.append({"new_tokens": new_tokens, **found})
    return frontier
