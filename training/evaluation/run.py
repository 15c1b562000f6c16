"""The evaluation stage: zero-shot accuracy, perplexity, generation speed and memory of one or more
models, and their generation samples.

  evaluate_models(EvalConfig) -> results.json, results.md and the efficiency plots in output_dir

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from data.artifacts import atomic_directory, check_output_dir, directory_fingerprint, library_versions
from data.config import save_config, to_dict
from data.embedded import resolve_model, resolve_tasks
from data.model_code import check_trust_remote_code
from data.precision import resolve_device, resolve_precision, torch_dtype
from data.text import TextSourceError, load_documents
from pruning.layers import count_parameters
from training.checkpoint import METADATA
from training.evaluation.config import EvalConfig, ModelEntry, PerplexitySection
from training.evaluation.grid import batch_frontier, latency_grid
from training.evaluation.memory import MemoryMeter
from training.evaluation.perplexity import perplexity, segment_stream
from training.evaluation.plots import write_plots
from training.evaluation.samples import generate_samples
from training.evaluation.tables import markdown_report
from training.evaluation.zeroshot import load_tasks, run_tasks, starts_with_bos
from training.export import export_checkpoint
from training.preflight import check_model_path

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


def load_model(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """Any checkpoint the pipeline makes; a quantized one (its config.json has a quantization_config)
    loads through its library's transformers integration, in the dtype it was saved in."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=str(device),
                                                    trust_remote_code=trust_remote_code).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()


def evaluate_model(entry: ModelEntry, path: str, config: EvalConfig, tasks: dict, texts: dict[str, list[str]],
                   device: torch.device, dtype: torch.dtype, meter: MemoryMeter) -> dict:
    from lm_eval.models.huggingface import HFLM

    model = load_model(path, device, dtype, config.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = Path(path)
    quantization = getattr(model.config, "quantization_config", None)
    result = {"name": entry.name, "path": entry.path, "blocks": model.config.num_hidden_layers,
              "params": count_parameters(model),
              "fingerprint": directory_fingerprint(local) if local.is_dir() else path}
    if quantization:
        result["quantization"] = quantization if isinstance(quantization, dict) else quantization.to_dict()
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
    if config.latency.batch_sizes and config.latency.new_tokens:
        with meter.limited():
            result["latency"] = latency_grid(model, tokenizer, config.latency, meter)
            if config.latency.max_batch:
                result["max_batch"] = batch_frontier(model, tokenizer, config.latency, meter, result["latency"])
    if config.samples.prompts:
        result["samples"] = generate_samples(model, tokenizer, config.samples)
    return result


def evaluate_models(config: EvalConfig) -> Path:
    check_output_dir(config.output_dir, config.overwrite)
    device = resolve_device(config.device)
    config.latency.check_device(device.type)
    meter = MemoryMeter(device, config.latency.memory_limit_gb)
    for entry in config.models:  # a module-pruned model is refused before anything loads, unless allowed
        check_trust_remote_code(resolve_model(entry.path), config.trust_remote_code)
    earlier = [row for path in config.compare for row in json.loads(Path(path).read_text())["models"]]
    include = resolve_tasks(config.zeroshot.include_path) if config.zeroshot.include_path else None
    tasks = load_tasks(config.zeroshot.tasks, Path(include) if include else None) if config.zeroshot.tasks else {}
    texts = load_texts(config.perplexity)
    precision = resolve_precision(config.dtype, device)
    dtype = torch_dtype(precision)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shorten-eval-") as scratch:
        paths = [resolve_checkpoint(m.path, Path(scratch), config.trust_remote_code) for m in config.models]
        for entry, path in zip(config.models, paths, strict=True):
            print(f"== evaluating {entry.name}: {entry.path}", flush=True)
            rows.append(evaluate_model(entry, path, config, tasks, texts, device, dtype, meter))
    settings = {"device": str(device), "dtype": precision, "zeroshot_add_bos_token": config.zeroshot.add_bos_token,
                "config": to_dict(config),
                "versions": library_versions()}
    with atomic_directory(config.output_dir, config.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps({"models": earlier + rows, **settings}, indent=2) + "\n")
        (tmp / "results.md").write_text(markdown_report(earlier + rows) + "\n")
        write_plots(earlier + rows, tmp)
        save_config(config, tmp / "eval_config.yaml")
    return config.output_dir
