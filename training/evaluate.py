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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.artifacts import atomic_directory, check_output_dir, directory_fingerprint, library_versions
from data.config import ConfigError, save_config, to_dict
from data.embedded import resolve_model, resolve_tasks
from data.text import TextSourceError, load_documents
from pruning.layers import count_parameters
from pruning.run import resolve_device, resolve_dtype
from training.checkpoint import METADATA
from training.export import DTYPES, export_checkpoint
from training.latency import measure_generation
from training.perplexity import BosPolicy, perplexity, segment_stream
from training.preflight import check_model_path
from training.zeroshot import PAPER_TASKS, load_tasks, run_tasks, starts_with_bos

# --- config ------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    name: str
    path: str


@dataclass
class PerplexitySet:
    name: str
    source: str
    subset: str | None = None
    split: str = "test"
    text_field: str = "text"


def paper_perplexity_sets() -> list[PerplexitySet]:
    """WikiText-2 test and PTB validation, the rows joined with blank lines, as the paper's code."""
    return [PerplexitySet("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "text"),
            PerplexitySet("ptb", "ptb_text_only", "penn_treebank", "validation", "sentence")]


@dataclass
class PerplexitySection:
    sets: list[PerplexitySet] = field(default_factory=paper_perplexity_sets)
    seq_lens: list[int] = field(default_factory=lambda: [128])
    bos: BosPolicy = "once"
    max_segments: int | None = None
    batch_size: int = 8

    __field_docs__ = {
        "sets": "texts: [{name, source (HF dataset name or local .parquet/.jsonl/.json/.txt), subset, split, "
                "text_field}]; [] skips perplexity",
        "seq_lens": "segment lengths: the paper's 128, and e.g. 2048 for the common long-window variant",
        "bos": "once: one BOS before the stream (LLaMA); every: BOS on each segment (Gemma needs it); none",
    }


@dataclass
class ZeroShotSection:
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    include_path: str | None = None
    batch_size: int = 8
    limit: int | None = None
    add_bos_token: bool | None = None

    __field_docs__ = {
        "add_bos_token": "BOS before each request: null = the tokenizer's default (lm-eval 0.4; LLaMA adds it), "
                         "false = none (how the official 2023 harness scored LLaMA), true = always",
        "tasks": "lm-eval task names; [] skips zero-shot (default: the paper's seven)",
        "include_path": "directory of extra lm-eval task YAMLs (local data); embedded:tasks has wiki_cloze",
        "limit": "evaluate only the first N items of each task (quick checks; not comparable to papers)",
    }


@dataclass
class LatencySection:
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    input_tokens: int = 12
    new_tokens: int = 128
    warmup: int = 10
    runs: int = 20

    __field_docs__ = {"batch_sizes": "one measurement per batch size; [] skips latency"}


@dataclass
class EvalConfig:
    model: str | None = None
    models: list[ModelEntry] = field(default_factory=list)
    compare: list[Path] = field(default_factory=list)
    output_dir: Path = Path("outputs/eval")
    overwrite: bool = False
    device: str = "auto"
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    latency: LatencySection = field(default_factory=LatencySection)

    __field_docs__ = {
        "model": "one model to evaluate (HF checkpoint, hub name, embedded:smollm2-135m, or <run>/checkpoints/step_N)",
        "models": "several: [{name: original, path: ...}, {name: pruned, path: ...}]",
        "compare": "results.json files of earlier evaluations to show in the same table",
        "dtype": "auto = bf16 on GPU, fp32 on CPU (the official evaluation: fp16 on the GPU)",
    }

    def validate(self) -> None:
        if self.model is not None:
            self.models = [ModelEntry(Path(self.model).name or self.model, self.model), *self.models]
            self.model = None
        if not self.models and not self.compare:
            raise ConfigError("nothing to evaluate: set model=<checkpoint> (or models=[...], or compare=[...])")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")
        for path in self.compare:
            if not Path(path).is_file():
                raise ConfigError(f"compare: {path} does not exist (give results.json files of earlier evaluations)")
        if any(n < 2 for n in self.perplexity.seq_lens) or any(b < 1 for b in self.latency.batch_sizes):
            raise ConfigError("perplexity.seq_lens must be >= 2 and latency.batch_sizes >= 1")


# --- the stage ---------------------------------------------------------------------------------


def resolve_checkpoint(path: str, scratch: Path) -> str:
    """A committed training checkpoint is exported to an HF checkpoint first; anything else passes."""
    resolved = resolve_model(path)
    if (Path(resolved) / METADATA).is_file():
        return str(export_checkpoint(Path(resolved), scratch / Path(resolved).name, DTYPES["fp32"]))
    return check_model_path(resolved)


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

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
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
    earlier = [row for path in config.compare for row in json.loads(Path(path).read_text())["models"]]
    include = resolve_tasks(config.zeroshot.include_path) if config.zeroshot.include_path else None
    tasks = load_tasks(config.zeroshot.tasks, Path(include) if include else None) if config.zeroshot.tasks else {}
    texts = load_texts(config.perplexity)
    device = resolve_device(config.device)
    precision = resolve_dtype(config.dtype, device)
    dtype = DTYPES[precision]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shorten-eval-") as scratch:
        paths = [resolve_checkpoint(m.path, Path(scratch)) for m in config.models]
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
