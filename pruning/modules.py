"""Attention and MLP sub-layers as pruning units (`unit=module`): which modules make up each unit, how
large each is, and removing units from a model, for good or for the time of one evaluation.

A unit is `(layer, "attn")` or `(layer, "mlp")`, written `3.attn`. Its modules are the sub-layer and
the norms only it uses, found by tracing one forward through a block (a norm whose output is the
sub-layer's input, or whose input is the sub-layer's output); a norm two units share stays. A layer
that loses both units is removed whole (`pruning/layers.remove_blocks`); one that loses a single unit
keeps its other one, and the model records it in `config.skipped_sublayers` (pruning/sublayers.py).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning.layers import LayersNotFoundError, find_decoder_layers, remove_blocks
from pruning.sublayers import UNITS, skip_sublayers, skip_unit

Unit = tuple[int, str]
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def unit_label(unit: Unit) -> str:
    return f"{unit[0]}.{unit[1]}"


def parse_unit(text: str) -> Unit:
    """`"3.attn"` -> `(3, "attn")`."""
    layer, _, kind = str(text).partition(".")
    if not layer.isdigit() or kind not in UNITS:
        raise ValueError(f"{text!r} is not a module: write LAYER.attn or LAYER.mlp, e.g. 3.attn")
    return int(layer), kind


def all_units(num_layers: int) -> list[Unit]:
    """Every unit in model order: 0.attn, 0.mlp, 1.attn, ..."""
    return [(layer, kind) for layer in range(num_layers) for kind in UNITS]


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _one_child(block: nn.Module, keys: Sequence[str], what: str) -> str:
    names = [name for name, _ in block.named_children()
             if any(key in name.lower() for key in keys) and "norm" not in name.lower()]
    if len(names) != 1:
        raise LayersNotFoundError(
            f"module-level pruning needs one {what} sub-layer per block; {type(block).__name__} has "
            f"{names or 'none'} among {[n for n, _ in block.named_children()]}: use unit=block")
    return names[0]


@torch.no_grad()
def find_sublayer_modules(model: PreTrainedModel) -> dict:
    """`{"layers": path, "attn": [sub-layer, *its norms], "mlp": [...]}` (a module-pruned model's own record
    if it has one). Traced on the first block, with one forward of two tokens; every block must share its
    structure."""
    recorded = getattr(model.config, "sublayer_modules", None)
    if recorded:
        return copy.deepcopy(recorded)
    path, layers = find_decoder_layers(model)
    block = layers[0]
    structure = [name for name, _ in block.named_children()]
    if any([name for name, _ in other.named_children()] != structure for other in layers):
        raise LayersNotFoundError(f"the blocks of {type(model).__name__} differ in structure: use unit=block")
    main = {"attn": _one_child(block, ("attn", "attention"), "attention"), "mlp": _one_child(block, _MLP_NAMES, "MLP")}
    inputs: dict[str, torch.Tensor | None] = {}
    outputs: dict[str, torch.Tensor | None] = {}
    handles = []
    for name, child in block.named_children():
        def pre(module, args, kwargs, name=name):
            inputs[name] = _first_tensor(args) if args else kwargs.get("hidden_states")

        def post(module, args, kwargs, output, name=name):
            outputs[name] = _first_tensor(output)

        handles += [child.register_forward_pre_hook(pre, with_kwargs=True),
                    child.register_forward_hook(post, with_kwargs=True)]
    try:
        device = next(model.parameters()).device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        mask = torch.zeros(1, 1, 2, 2, dtype=model.dtype, device=device)  # taken as given: works on the meta device
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def next_to(sub: str) -> set[str]:
        return {name for name in structure if name not in main.values() and (
            (outputs.get(name) is not None and outputs[name] is inputs.get(sub))
            or (inputs.get(name) is not None and inputs[name] is outputs.get(sub)))}

    norms = {unit: next_to(main[unit]) for unit in UNITS}
    shared = norms["attn"] & norms["mlp"]
    return {"layers": path, **{unit: [main[unit], *sorted(norms[unit] - shared)] for unit in UNITS}}


def skipped_units(model: PreTrainedModel) -> list[Unit]:
    """Units the model already lacks (a module-pruned checkpoint)."""
    skipped = getattr(model.config, "skipped_sublayers", None) or []
    return [(layer, kind) for layer, kinds in enumerate(skipped) for kind in kinds]


def unit_parameter_counts(model: nn.Module, modules: dict) -> dict[Unit, int]:
    """Parameters of every unit still present (sub-layer and its own norms)."""
    _, layers = find_decoder_layers(model)
    gone = set(skipped_units(model))
    return {(index, kind): sum(p.numel() for name in modules[kind] for p in getattr(block, name).parameters())
            for index, block in enumerate(layers) for kind in UNITS if (index, kind) not in gone}


def unit_weights(model: nn.Module, modules: dict, units: Sequence[Unit]) -> list[list[nn.Parameter]]:
    """The weights (matrices and norm scales, no biases, as the block criteria) of each unit."""
    _, layers = find_decoder_layers(model)
    return [[p for name in modules[kind] for n, p in getattr(layers[index], name).named_parameters()
             if n.endswith("weight")] for index, kind in units]


@contextlib.contextmanager
def units_skipped(model: nn.Module, units: Sequence[Unit], modules: dict) -> Iterator[None]:
    """The model without `units` inside the block, as it was after."""
    _, layers = find_decoder_layers(model)
    saved = []
    for index, kind in units:
        block = layers[index]
        saved += [(block, name, getattr(block, name)) for name in modules[kind]]
        skip_unit(block, kind, index, modules)
    try:
        yield
    finally:
        for block, name, module in reversed(saved):
            setattr(block, name, module)


def remove_units(model: PreTrainedModel, units: Sequence[Unit], modules: dict) -> tuple[list[int], list[int]]:
    """Remove units in place: layers left with neither unit go whole, the others lose the unit, and the
    config records what each kept layer lacks. Returns the removed and kept layer indices."""
    _, layers = find_decoder_layers(model)
    before = [set(kinds) for kinds in (getattr(model.config, "skipped_sublayers", None) or [[]] * len(layers))]
    after = [set(kinds) for kinds in before]
    for index, kind in units:
        after[index].add(kind)
    drop = [index for index, kinds in enumerate(after) if kinds >= set(UNITS)]
    keep = remove_blocks(model, drop)
    _, layers = find_decoder_layers(model)
    for new_index, old in enumerate(keep):
        for kind in sorted(after[old] - before[old], key=UNITS.index):
            skip_unit(layers[new_index], kind, new_index, modules)
    record = [sorted(after[old], key=UNITS.index) for old in keep]
    if any(record):
        model.config.skipped_sublayers = record
        model.config.sublayer_modules = modules
    else:  # only whole layers went: a plain checkpoint
        for key in ("skipped_sublayers", "sublayer_modules"):
            if hasattr(model.config, key):
                delattr(model.config, key)
    return drop, keep


def rebuild_without_units(model: PreTrainedModel, units: Sequence[Unit], modules: dict) -> PreTrainedModel:
    """A fresh model built from the pruned config (as the checkpoint's class builds it: `skip_sublayers`
    after construction) with the kept weights loaded strictly: the reference the fast scores are tested
    against."""
    pruned = copy.deepcopy(model)
    remove_units(pruned, units, modules)
    fresh = type(model)(pruned.config)
    skip_sublayers(fresh, pruned.config)
    fresh.to(dtype=model.dtype, device=model.device).load_state_dict(pruned.state_dict(), strict=True)
    return fresh.eval()
