"""The pruning stage: score blocks (or, `unit=module`, their attention and MLP sub-layers), remove the
least important in one shot, write the checkpoint.

Everything that can fail cheaply (config, output path, model config, its own modeling code, target,
calibration text) is checked before the weights are loaded; the output is written under a temporary
name, verified and renamed into place. A checkpoint in which some layer lost only one sub-layer
carries its modeling code (pruning/checkpoint_code.py).
"""

from __future__ import annotations

import math
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
from data.model_code import check_trust_remote_code, model_code_files
from data.precision import resolve_device, resolve_precision, torch_dtype
from data.text import load_documents
from pruning import scores as criteria
from pruning.calibration import sample_calibration
from pruning.checkpoint_code import write_model_code
from pruning.config import PruneConfig
from pruning.layers import block_parameter_counts, count_parameters, find_decoder_layers, remove_blocks
from pruning.modules import (
    all_units,
    find_sublayer_modules,
    parse_unit,
    remove_units,
    unit_label,
    unit_parameter_counts,
    unit_weights,
)
from pruning.report import plot_block_importance
from pruning.selection import ModuleTarget, blocks_for_ratio, check_target, choose_blocks, protected_blocks


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


def _load_model_config(model: str, trust_remote_code: bool):
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise ModelLoadError(f"model path {model} does not exist or is not a directory; give a Hugging Face "
                             "checkpoint directory or hub name")
    check_trust_remote_code(model, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelLoadError(f"cannot read a model config from {model!r}: {err}. Give a Hugging Face checkpoint "
                             "directory (with config.json) or a hub name you can reach") from err


def _skeleton(config, trust_remote_code: bool) -> PreTrainedModel:
    """The model's structure without weights (meta device): for checks before loading anything."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


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


def plan_module_removal(config: PruneConfig, skeleton: PreTrainedModel) -> tuple[ModuleTarget, dict]:
    """unit=module: the target over sub-layers, and where the sub-layers live; raises before any expensive work."""
    modules = find_sublayer_modules(skeleton)
    _, layers = find_decoder_layers(skeleton)
    target = config.target
    budget = target.param_ratio * count_parameters(skeleton) if target.param_ratio is not None else None
    explicit = [parse_unit(m) for m in target.modules] if target.modules is not None else None
    plan = ModuleTarget(unit_parameter_counts(skeleton, modules), protected_blocks(len(layers), *config.protected_counts),
                        target.num_modules, budget, explicit)
    plan.check()
    return plan, modules


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


@dataclass
class ModulePrunePlan:
    """unit=module: what a run would do, known from the model's config alone."""

    target: ModuleTarget
    num_blocks: int
    params_before: int

    def lines(self) -> list[str]:
        target = self.target
        sizes = {kind: size for (_, kind), size in target.unit_params.items()}
        lines = [f"blocks: {self.num_blocks}, protected: {target.protected}",
                 f"candidate modules ({len(target.candidates)}): attention and MLP of blocks "
                 f"{sorted({i for i, _ in target.candidates})}",
                 "module sizes: " + ", ".join(f"{kind} {size / 1e6:.2f}M" for kind, size in sizes.items())]
        if target.explicit is not None:
            gone = sum(target.unit_params[u] for u in target.explicit)
            return [*lines, f"would remove {[unit_label(u) for u in target.explicit]}",
                    f"parameters: {self.params_before / 1e9:.2f}B -> {(self.params_before - gone) / 1e9:.2f}B "
                    f"(-{gone / self.params_before:.1%})"]
        if target.num_remove is not None:
            return [*lines, f"would remove the {target.num_remove} least important modules (which: by the scores)"]
        return [*lines, f"would remove the least important modules within {target.budget / 1e6:,.1f}M parameters: "
                        f"{int(target.budget // max(sizes.values()))} to {int(target.budget // min(sizes.values()))} "
                        "modules, by the scores"]


def dry_run(config: PruneConfig) -> PrunePlan | ModulePrunePlan:
    """The plan from the model's config on the meta device: seconds for a 13B model, no download of weights."""
    skeleton = _skeleton(_load_model_config(resolve_model(config.model), config.trust_remote_code),
                         config.trust_remote_code)
    if config.unit == "module":
        target, _ = plan_module_removal(config, skeleton)
        return ModulePrunePlan(target, len(find_decoder_layers(skeleton)[1]), count_parameters(skeleton))
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


def score_modules(model: PreTrainedModel, calibration: torch.Tensor, config: PruneConfig, target: ModuleTarget,
                  modules: dict) -> tuple[list[float], list[tuple[int, str]], dict]:
    """unit=module: the importance of every sub-layer (`all_units` order; nan for units already gone) and the
    sub-layers to remove, in the order chosen."""
    batch = config.calibration.batch_size
    base = config.base_criterion
    units = all_units(len(find_decoder_layers(model)[1]))
    if base == "ppl" and config.iterative and target.explicit is None:
        order, rounds = criteria.iterative_module_order(model, calibration, modules, target, batch)
        return rounds[0], order, {"removal_order": [unit_label(u) for u in order], "rounds": rounds}
    if base == "ppl":
        scores = criteria.module_ppl_scores(model, calibration, modules, batch)
    else:
        present = [u for u in units if u in target.unit_params]
        groups = unit_weights(model, modules, present)
        values = (criteria.taylor_scores(model, calibration, batch, groups) if base == "taylor"
                  else criteria.magnitude_scores(model, groups))
        by_unit = dict(zip(present, values, strict=True))
        scores = [by_unit.get(u, math.nan) for u in units]
    rank = {unit: (scores[i], i) for i, unit in enumerate(units)}
    return scores, target.take(sorted(target.candidates, key=rank.__getitem__)), {}


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
    model_config = _load_model_config(model_path, config.trust_remote_code)
    skeleton = _skeleton(model_config, config.trust_remote_code)
    if config.unit == "module":
        target, modules = plan_module_removal(config, skeleton)
        protected = target.protected
    else:
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
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(precision),
                                                 trust_remote_code=config.trust_remote_code).to(device).eval()
    calibration = calibration.to(device)
    timings["load_s"] = time.perf_counter() - tick
    params_before = count_parameters(model)
    ppl_before = criteria.calibration_perplexity(model, calibration, cal.batch_size)

    tick = time.perf_counter()
    if config.unit == "module":
        scores, removed_units, extras = score_modules(model, calibration, config, target, modules)
        removed, kept = remove_units(model, removed_units, modules)
        units = all_units(num_layers)
        extras = {"units": [unit_label(u) for u in units], **extras,
                  "removed_modules": [unit_label(u) for u in sorted(removed_units)],
                  "skipped_sublayers": getattr(model.config, "skipped_sublayers", None), "sublayer_modules": modules}
        marked = ([units.index(u) for u in removed_units], [i for i, u in enumerate(units) if u[0] in protected])
    else:
        scores, removed, extras = score_blocks(model, calibration, config, num_remove, protected)
        if config.target.blocks is not None:
            removed = sorted(config.target.blocks)
        kept = remove_blocks(model, removed)
        marked = (removed, protected)
    timings["scoring_s"] = time.perf_counter() - tick

    lineage_after = lineage.after_prune(removed, config.criterion)
    params_after = count_parameters(model)
    ppl_after = criteria.calibration_perplexity(model, calibration, cal.batch_size)
    report = {
        "criterion": config.criterion,
        "unit": config.unit,
        "iterative": config.iterative,
        "model": config.model,
        "num_blocks_before": num_layers,
        "num_blocks_after": len(kept),
        "scores": scores,
        "score_meaning": "higher = more important" + (f" (calibration PPL without the {config.unit})"
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
        report["modeling_code"] = write_model_code(tmp, model)
        tokenizer.save_pretrained(tmp)
        if config.verify_reload:
            verify_checkpoint(tmp, model)
        timings["save_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - start
        lineage_after.write(tmp)
        report["fingerprints"]["output"] = directory_fingerprint(tmp)
        write_json_atomic(tmp / "pruning_report.json", report)
        if config.unit == "module":
            axis = dict(labels=extras["units"], unit="module", xlabel="module (block.attn, block.mlp)")
        else:
            renumbered = lineage.blocks != list(range(num_layers))
            axis = dict(labels=[str(i) for i in lineage.blocks],
                        xlabel="block index in the original model" if renumbered else "block index")
        plot_block_importance(scores, *marked, config.criterion, Path(str(config.model)).name,
                              tmp / "block_importance.png", **axis)
        save_config(config, tmp / "prune_config.yaml")
    return PruneResult(output_dir, removed, kept, scores, report)


def _structure(model: PreTrainedModel) -> list[list[tuple[str, str]]]:
    return [[(name, type(child).__name__) for name, child in block.named_children()]
            for block in find_decoder_layers(model)[1]]


def verify_checkpoint(path: Path, model: PreTrainedModel) -> None:
    """Reload as a user would (with the checkpoint's own code, if it has any) and insist every weight was found
    (no silent re-init) and every block has the in-memory model's sub-modules."""
    code = bool(model_code_files(path))
    reloaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, trust_remote_code=code)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems or _structure(reloaded) != _structure(model):
        raise RuntimeError(f"the written checkpoint does not reload as the pruned model: {problems or 'its blocks differ'}")
