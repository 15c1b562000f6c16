"""The pruning stage: score blocks, remove the least important in one shot, write the checkpoint.

Everything that can fail cheaply (config, output path, model config, target, calibration text) is
checked before the weights are loaded; the output is written under a temporary name, verified and
renamed into place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from data.artifacts import (
    atomic_directory,
    check_output_dir,
    directory_fingerprint,
    file_sha256,
    library_versions,
    write_json_atomic,
)
from data.config import save_config, to_dict
from data.embedded import resolve_model, resolve_text
from data.lineage import Lineage
from data.precision import resolve_device, resolve_precision, torch_dtype
from data.text import load_documents
from pruning import scores as criteria
from pruning.calibration import sample_calibration
from pruning.config import PruneConfig
from pruning.layers import block_parameter_counts, count_parameters, find_decoder_layers, remove_blocks
from pruning.report import plot_block_importance
from pruning.selection import blocks_for_ratio, check_target, choose_blocks, protected_blocks


class ModelLoadError(ValueError):
    """The model path or name cannot be read."""


@dataclass
class PruneResult:
    output_dir: Path
    removed: list[int]
    kept: list[int]
    scores: list[float]
    report: dict

    def artifact_lines(self) -> list[str]:
        return [f"checkpoint: {self.output_dir}", f"report:     {self.output_dir / 'pruning_report.json'}",
                f"plot:       {self.output_dir / 'block_importance.png'}"]


def _load_model_config(model: str):
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise ModelLoadError(f"model path {model} does not exist or is not a directory; give a Hugging Face "
                             "checkpoint directory or hub name")
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:
        raise ModelLoadError(f"cannot read a model config from {model!r}: {err}. Give a Hugging Face checkpoint "
                             "directory (with config.json) or a hub name you can reach") from err


def _skeleton(config) -> PreTrainedModel:
    """The model's structure without weights (meta device): for checks before loading anything."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_removal(config: PruneConfig, skeleton: PreTrainedModel) -> tuple[int, list[int]]:
    """Number of blocks to remove and the protected blocks; raises before any expensive work."""
    _, layers = find_decoder_layers(skeleton)
    num_layers = len(layers)
    protected = protected_blocks(num_layers, *config.protected_counts)
    target = config.target
    if target.blocks is not None:
        num_remove = len(target.blocks)
    elif target.num_blocks is not None:
        num_remove = target.num_blocks
    else:
        num_remove = blocks_for_ratio(block_parameter_counts(skeleton), count_parameters(skeleton),
                                      target.param_ratio)
    check_target(num_layers, protected, num_remove, target.blocks)
    return num_remove, protected


@dataclass
class PrunePlan:
    """What a run would do, known from the model's config alone (no weights)."""

    num_blocks: int
    num_remove: int
    protected: list[int]
    params_before: int
    params_after: int

    @property
    def candidates(self) -> list[int]:
        return [i for i in range(self.num_blocks) if i not in self.protected]

    def lines(self) -> list[str]:
        return [f"blocks: {self.num_blocks}, protected: {self.protected}",
                f"candidates ({len(self.candidates)}): {self.candidates}",
                f"would remove {self.num_remove} blocks -> {self.num_blocks - self.num_remove} blocks",
                f"parameters: {self.params_before / 1e9:.2f}B -> {self.params_after / 1e9:.2f}B "
                f"(-{1 - self.params_after / self.params_before:.1%})"]


def dry_run(config: PruneConfig) -> PrunePlan:
    """The plan from the model's config on the meta device: seconds for a 13B model, no download of weights."""
    skeleton = _skeleton(_load_model_config(resolve_model(config.model)))
    num_remove, protected = plan_removal(config, skeleton)
    block_params = block_parameter_counts(skeleton)
    removed = sorted(block_params)[:num_remove]  # blocks of one model have the same size unless stated otherwise
    before = count_parameters(skeleton)
    return PrunePlan(len(block_params), num_remove, protected, before, before - sum(removed))


def score_blocks(model: PreTrainedModel, calibration: torch.Tensor, config: PruneConfig,
                 num_remove: int, protected: list[int]) -> tuple[list[float], list[int], dict]:
    """Importance of every block and the blocks to remove (plus criterion-specific extras)."""
    batch = config.calibration.batch_size
    base = config.base_criterion
    if base == "ppl" and config.iterative:
        order, rounds = criteria.iterative_ppl_order(model, calibration, num_remove, protected, batch)
        return rounds[0], sorted(order), {"removal_order": order, "rounds": rounds}
    if base == "ppl":
        scores = criteria.ppl_scores(model, calibration, batch)
    elif base == "taylor":
        scores = criteria.taylor_scores(model, calibration, batch)
    elif base == "mag":
        scores = criteria.magnitude_scores(model)
    else:
        scores = criteria.block_influence_scores(model, calibration, batch)
    return scores, choose_blocks(scores, num_remove, protected), {}


def _fingerprint(source: str) -> str | None:
    path = Path(source)
    if path.is_dir():
        return directory_fingerprint(path)
    if path.is_file():
        return file_sha256(path)
    return None


def prune(config: PruneConfig) -> PruneResult:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite)

    model_path = resolve_model(config.model)
    model_config = _load_model_config(model_path)
    skeleton = _skeleton(model_config)
    num_remove, protected = plan_removal(config, skeleton)
    num_layers = model_config.num_hidden_layers
    lineage = Lineage.of(model_path, num_layers, config.model)  # an earlier prune's numbering, if any
    del skeleton

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cal = config.calibration
    documents = load_documents(cal.source, cal.text_field, cal.split, cal.subset, keep_empty=True)
    calibration = sample_calibration(documents, tokenizer, cal.num_samples, cal.seq_len, cal.seed, cal.bos)
    timings["setup_s"] = time.perf_counter() - start

    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    tick = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(precision)).to(device).eval()
    calibration = calibration.to(device)
    timings["load_s"] = time.perf_counter() - tick
    params_before = count_parameters(model)
    ppl_before = criteria.calibration_perplexity(model, calibration, cal.batch_size)

    tick = time.perf_counter()
    scores, removed, extras = score_blocks(model, calibration, config, num_remove, protected)
    if config.target.blocks is not None:
        removed = sorted(config.target.blocks)
    timings["scoring_s"] = time.perf_counter() - tick

    kept = remove_blocks(model, removed)
    lineage_after = lineage.after_prune(removed, config.criterion)
    params_after = count_parameters(model)
    ppl_after = criteria.calibration_perplexity(model, calibration, cal.batch_size)
    report = {
        "criterion": config.criterion,
        "iterative": config.iterative,
        "model": config.model,
        "num_blocks_before": num_layers,
        "num_blocks_after": len(kept),
        "scores": scores,
        "score_meaning": "higher = more important" + (" (calibration PPL without the block)"
                                                      if config.base_criterion == "ppl" else ""),
        "protected": protected,
        "removed": removed,
        "kept": kept,
        "original_model": lineage.original_model,
        "removed_original": lineage.original(removed),
        "kept_original": lineage_after.blocks,
        "blocks_original": lineage.blocks,
        **extras,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "target": to_dict(config.target),
        "calibration_ppl_before": ppl_before,
        "calibration_ppl_after": ppl_after,
        "calibration": {**to_dict(config.calibration), "token_ids": calibration.tolist()},
        "dtype": precision,
        "device": str(device),
        "timings": timings,
        "versions": library_versions(),
        "fingerprints": {"model": _fingerprint(model_path),
                         "calibration_source": _fingerprint(resolve_text(cal.source))},
    }
    tick = time.perf_counter()
    with atomic_directory(output_dir, overwrite=config.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if config.verify_reload:
            verify_checkpoint(tmp, len(kept))
        timings["save_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - start
        lineage_after.write(tmp)
        report["fingerprints"]["output"] = directory_fingerprint(tmp)
        write_json_atomic(tmp / "pruning_report.json", report)
        plot_block_importance(scores, removed, protected, config.criterion, Path(str(config.model)).name,
                              tmp / "block_importance.png", lineage.blocks)
        save_config(config, tmp / "prune_config.yaml")
    return PruneResult(output_dir, removed, kept, scores, report)


def verify_checkpoint(path: Path, num_layers: int) -> None:
    """Reload with plain transformers and insist every weight was found (no silent re-init)."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems or model.config.num_hidden_layers != num_layers:
        raise RuntimeError(f"the written checkpoint does not reload cleanly: {problems}")
