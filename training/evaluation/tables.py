"""results.md: the models side by side, as the paper's tables.

The main table (one row per model: size, perplexities, zero-shot, speed at the smallest batch),
then, where measured, the latency/throughput and peak-memory grids over batch size M and output
length L (Table 8), the largest batch that fits per L, and the generation samples (Table 4).
"""

from __future__ import annotations

from training.evaluation.memory import GPU_ALLOCATED


def markdown_report(rows: list[dict]) -> str:
    parts = [markdown_table(rows)]
    if any(row.get("latency") for row in rows):
        parts += [latency_grid_table(rows), memory_table(rows)]
    if any(row.get("max_batch") for row in rows):
        parts.append(frontier_table(rows))
    if any(row.get("samples") for row in rows):
        parts.append(samples_table(rows))
    return "\n\n".join(part for part in parts if part)


# --- the main table ----------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """One row per model: size, perplexities, zero-shot per task and average (%), speed, peak memory."""
    ppl_keys = sorted({k for r in rows for k in r.get("perplexity", {})})
    task_keys = list(dict.fromkeys(t for r in rows for t in r.get("zeroshot", {}).get("tasks", {})))
    headline = headline_cells(rows)
    kinds = memory_kinds(rows)
    header = ["model", "params", "blocks", *[f"PPL {k}" for k in ppl_keys]]
    header += [f"{t} ({rows_metric(rows, t)})" for t in task_keys] + (["avg acc"] if task_keys else [])
    lengths = {n for _, n in headline}
    for m, n in headline:
        where = f"bs {m}" if len(lengths) == 1 else f"bs {m}, L {n}"
        header += [f"latency s ({where})", f"tokens/s ({where})"]
    header += [f"peak {memory_label(kind)} GB" for kind in kinds]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], f"{row['params'] / 1e6:,.1f}M", str(row["blocks"])]
        cells += [_number(row.get("perplexity", {}).get(k)) for k in ppl_keys]
        zeroshot = row.get("zeroshot", {})
        cells += [_number(100 * zeroshot["tasks"][t]["value"] if t in zeroshot.get("tasks", {}) else None, 1)
                  for t in task_keys]
        if task_keys:
            cells.append(_number(100 * zeroshot["average"] if zeroshot else None, 1))
        by_cell = cells_of(row)
        for key in headline:
            cell = by_cell.get(key)
            cells += [_speed(cell, "latency_s", 3), _speed(cell, "tokens_per_s", 1)]
        for kind in kinds:
            peaks = [c["peak_memory_gb"] for c in by_cell.values() if ok(c) and c.get("peak_memory_gb") is not None
                     and cell_kind(c) == kind]
            cells.append(_number(max(peaks) if peaks else None, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_metric(rows: list[dict], task: str) -> str:
    for row in rows:
        if task in row.get("zeroshot", {}).get("tasks", {}):
            return row["zeroshot"]["tasks"][task]["metric"]
    return "acc"


# --- the grids ---------------------------------------------------------------------------------


def latency_grid_table(rows: list[dict]) -> str:
    measured = [r for r in rows if r.get("latency")]
    first = next(c for r in measured for c in r["latency"] if ok(c)) if any_ok(measured) else None
    protocol = "" if first is None else (
        f": {first['input_tokens']} input tokens, mean of {first['runs']} runs after {first['warmup']} warm-ups, "
        + ("sampled (top-k/top-p)" if first.get("do_sample") else "greedy"))
    header = ["L", "M"] + [f"{r['name']} {what}" for r in measured for what in ("s", "tokens/s")]
    lines = [f"### Latency and throughput by output length L and batch size M{protocol}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in grid_keys(measured):
        values = []
        for row in measured:
            cell = cells_of(row).get(key)
            values += [_speed(cell, "latency_s", 3), _speed(cell, "tokens_per_s", 1)]
        lines.append(f"| {key[1]} | {key[0]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Table 8: peak memory (GiB) per model by L and M; OOM where a cell did not fit."""
    measured = [r for r in rows if r.get("latency")]
    kinds = memory_kinds(measured)
    if not kinds:
        return ""
    lines = [f"### Peak memory (GiB) by output length L and batch size M: {', '.join(kinds)}", "",
             "| L | M | " + " | ".join(r["name"] for r in measured) + " |", "|" + "---|" * (2 + len(measured))]
    for key in grid_keys(measured):
        values = []
        for row in measured:
            cell = cells_of(row).get(key)
            values.append("-" if cell is None else "OOM" if not ok(cell) else _number(cell.get("peak_memory_gb"), 3))
        lines.append(f"| {key[1]} | {key[0]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def frontier_table(rows: list[dict]) -> str:
    """The largest batch that fits per model and L, and where the first model fails and another does not."""
    searched = [r for r in rows if r.get("max_batch")]
    lengths = sorted({f["new_tokens"] for r in searched for f in r["max_batch"]})
    lines = ["### Largest batch that fits (latency.max_batch)", "",
             "| model | " + " | ".join(f"L {n}" for n in lengths) + " |", "|" + "---|" * (1 + len(lengths))]
    for row in searched:
        found = {f["new_tokens"]: f for f in row["max_batch"]}
        lines.append(f"| {row['name']} | " + " | ".join(_frontier(found.get(n)) for n in lengths) + " |")
    reference, notes = searched[0], []
    for row in searched[1:]:
        for n in lengths:
            ref, other = _frontier_at(reference, n), _frontier_at(row, n)
            if ref and other and other["max_batch"] > ref["max_batch"]:
                notes.append(f"- L {n}: {reference['name']} runs out of memory from batch {ref['first_oom']}; "
                             f"{row['name']} runs up to batch {_frontier(other)}")
    return "\n".join(lines + ([""] + notes if notes else []))


def samples_table(rows: list[dict]) -> str:
    """Table 4: one row per prompt, each model's continuation in its own column."""
    sampled = [r for r in rows if r.get("samples")]
    prompts = list(dict.fromkeys(s["prompt"] for r in sampled for s in r["samples"]))
    lines = ["### Generation samples", "", "| prompt | " + " | ".join(r["name"] for r in sampled) + " |",
             "|" + "---|" * (1 + len(sampled))]
    for prompt in prompts:
        texts = [next((s["text"] for s in r["samples"] if s["prompt"] == prompt), "-") for r in sampled]
        lines.append("| " + " | ".join(_markdown_cell(t) for t in [prompt, *texts]) + " |")
    return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------


def ok(cell: dict) -> bool:
    return cell.get("status", "ok") == "ok"


def any_ok(rows: list[dict]) -> bool:
    return any(ok(c) for r in rows for c in r.get("latency", []))


def cell_kind(cell: dict) -> str:
    return cell.get("memory") or GPU_ALLOCATED  # results written before the CPU peak only had GPU peaks


def memory_kinds(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(cell_kind(c) for r in rows for c in r.get("latency", [])
                              if ok(c) and c.get("peak_memory_gb") is not None))


def memory_label(kind: str) -> str:
    return "GPU" if kind == GPU_ALLOCATED else "RSS"


def cells_of(row: dict) -> dict[tuple[int, int], dict]:
    """{(batch size, new tokens): cell}; results written before the grid give one L per row."""
    return {(c["batch_size"], c["new_tokens"]): c for c in row.get("latency", [])}


def grid_keys(rows: list[dict]) -> list[tuple[int, int]]:
    return sorted({key for r in rows for key in cells_of(r)}, key=lambda k: (k[1], k[0]))


def headline_cells(rows: list[dict]) -> list[tuple[int, int]]:
    """The speed the main table shows: the smallest batch (the paper's 1) at each output length."""
    keys = grid_keys(rows)
    if not keys:
        return []
    smallest = min(m for m, _ in keys)
    return [(m, n) for m, n in keys if m == smallest]


def _frontier_at(row: dict, new_tokens: int) -> dict | None:
    return next((f for f in row["max_batch"] if f["new_tokens"] == new_tokens), None)


def _frontier(found: dict | None) -> str:
    if found is None:
        return "-"
    return f">= {found['max_batch']}" if found.get("capped") else str(found["max_batch"])


def _speed(cell: dict | None, key: str, digits: int) -> str:
    if cell is None:
        return "-"
    return "OOM" if not ok(cell) else _number(cell.get(key), digits)


def _markdown_cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
