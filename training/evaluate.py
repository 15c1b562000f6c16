"""The evaluation stage: zero-shot accuracy, perplexity and generation speed of one or more models.

  evaluate_models(EvalConfig) -> results.json + results.md in output_dir

Models are Hugging Face checkpoints (a path, hub name, embedded:smollm2-135m) or committed
training checkpoints (`<run>/checkpoints/step_N`, exported first). Tasks, perplexity texts and
models are all resolved before the first model is evaluated, so a missing dataset fails at once.
Several models, and results of earlier runs (`compare`), are laid side by side in one table, as
in the paper's tables.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.artifacts import atomic_directory, check_output_dir, directory_fingerprint, library_versions
from data.config import save_config, to_dict
from data.embedded import resolve_model, resolve_tasks
from data.model_code import check_trust_remote_code
from data.precision import resolve_device, resolve_precision, torch_dtype
from data.text import TextSourceError, load_documents
from pruning.layers import count_parameters
from training.checkpoint import METADATA
from training.eval_config import EvalConfig, ModelEntry, PerplexitySection
from training.export import export_checkpoint
from training.latency import measure_generation
from training.perplexity import perplexity, segment_stream
from training.preflight import check_model_path
from training.zeroshot import load_tasks, run_tasks, starts_with_bos

# --- the stage ---------------------------------------------------------------------------------


def resolve_checkpoint(path: str, scratch: Path, trust_remote_code: bool = False) -> str:
    """A committed training checkpoint is exported to an HF checkpoint first; anything else passes."""
    resolved = resolve_model(path)
    if (Path(resolved) / METADATA).is_file():
        return str(export_checkpoint(Path(resolved), scratch / Path(resolved).name, torch.float32, trust_remote_code))
    return check_model_path(resolved, trust_remote_code)


def load_texts(config: PerplexitySection) -> dict[str, list[str]]:
    texts = {}
    for i, entry in enumerate(config.sets):
        try:
            texts[entry.name] = load_documents(entry.source, entry.text_field, entry.split, entry.subset,
                                               keep_empty=True)
        except TextSourceError as err:
            raise TextSourceError(f"perplexity.sets[{i}] ({entry.name}): {err}. Offline, set its source to a "
                                  "local file in the same format (e.g. the dataset's .parquet) or perplexity.sets=[]"
                                  ) from err
    return texts


def evaluate_model(entry: ModelEntry, path: str, config: EvalConfig, tasks: dict, texts: dict[str, list[str]],
                   device: torch.device, dtype: torch.dtype) -> dict:
    from lm_eval.models.huggingface import HFLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=config.trust_remote_code
                                                 ).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = Path(path)
    result = {"name": entry.name, "path": entry.path, "blocks": model.config.num_hidden_layers,
              "params": count_parameters(model),
              "fingerprint": directory_fingerprint(local) if local.is_dir() else path}
    if tasks:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.zeroshot.batch_size, device=str(device),
                  add_bos_token=config.zeroshot.add_bos_token)
        result["zeroshot_bos"] = starts_with_bos(lm)
        result["zeroshot"] = run_tasks(lm, tasks, config.zeroshot.tasks, limit=config.zeroshot.limit)
    result["perplexity"] = {}
    for name, docs in texts.items():
        for seq_len in config.perplexity.seq_lens:
            segments = segment_stream(docs, tokenizer, seq_len, config.perplexity.bos, config.perplexity.max_segments)
            result["perplexity"][f"{name}@{seq_len}"] = perplexity(model, segments, config.perplexity.batch_size,
                                                                   progress=True)
    result["latency"] = [measure_generation(model, tokenizer, b, config.latency.input_tokens,
                                            config.latency.new_tokens, config.latency.warmup, config.latency.runs)
                         for b in config.latency.batch_sizes]
    return result


def evaluate_models(config: EvalConfig) -> Path:
    check_output_dir(config.output_dir, config.overwrite)
    for entry in config.models:  # a module-pruned model is refused before anything loads, unless allowed
        check_trust_remote_code(resolve_model(entry.path), config.trust_remote_code)
    earlier = [row for path in config.compare for row in json.loads(Path(path).read_text())["models"]]
    include = resolve_tasks(config.zeroshot.include_path) if config.zeroshot.include_path else None
    tasks = load_tasks(config.zeroshot.tasks, Path(include) if include else None) if config.zeroshot.tasks else {}
    texts = load_texts(config.perplexity)
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    dtype = torch_dtype(precision)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shorten-eval-") as scratch:
        paths = [resolve_checkpoint(m.path, Path(scratch), config.trust_remote_code) for m in config.models]
        for entry, path in zip(config.models, paths, strict=True):
            print(f"== evaluating {entry.name}: {entry.path}", flush=True)
            rows.append(evaluate_model(entry, path, config, tasks, texts, device, dtype))
    settings = {"device": str(device), "dtype": precision, "zeroshot_add_bos_token": config.zeroshot.add_bos_token,
                "config": to_dict(config),
                "versions": library_versions()}
    with atomic_directory(config.output_dir, config.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps({"models": earlier + rows, **settings}, indent=2) + "\n")
        (tmp / "results.md").write_text(markdown_table(earlier + rows) + "\n")
        save_config(config, tmp / "eval_config.yaml")
    return config.output_dir


# --- the table ---------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """One row per model: size, perplexities, zero-shot per task and average (%), speed."""
    ppl_keys = sorted({k for r in rows for k in r.get("perplexity", {})})
    task_keys = list(dict.fromkeys(t for r in rows for t in r.get("zeroshot", {}).get("tasks", {})))
    batch_sizes = sorted({lat["batch_size"] for r in rows for lat in r.get("latency", [])})
    header = ["model", "params", "blocks", *[f"PPL {k}" for k in ppl_keys]]
    header += [f"{t} ({rows_metric(rows, t)})" for t in task_keys] + (["avg acc"] if task_keys else [])
    for b in batch_sizes:
        header += [f"latency s (bs {b})", f"tokens/s (bs {b})"]
    if any(lat.get("peak_memory_gb") for r in rows for lat in r.get("latency", [])):
        header.append("peak GPU GB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], f"{row['params'] / 1e6:,.1f}M", str(row["blocks"])]
        cells += [_number(row.get("perplexity", {}).get(k)) for k in ppl_keys]
        zeroshot = row.get("zeroshot", {})
        cells += [_number(100 * zeroshot["tasks"][t]["value"] if t in zeroshot.get("tasks", {}) else None, 1)
                  for t in task_keys]
        if task_keys:
            cells.append(_number(100 * zeroshot["average"] if zeroshot else None, 1))
        by_batch = {lat["batch_size"]: lat for lat in row.get("latency", [])}
        for b in batch_sizes:
            lat = by_batch.get(b)
            cells += [_number(lat and lat["latency_s"], 3), _number(lat and lat["tokens_per_s"], 1)]
        if header[-1] == "peak GPU GB":
            peaks = [lat.get("peak_memory_gb") for lat in row.get("latency", []) if lat.get("peak_memory_gb")]
            cells.append(_number(max(peaks) if peaks else None, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_metric(rows: list[dict], task: str) -> str:
    for row in rows:
        if task in row.get("zeroshot", {}).get("tasks", {}):
            return row["zeroshot"]["tasks"][task]["metric"]
    return "acc"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
