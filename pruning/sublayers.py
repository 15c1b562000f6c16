"""Decoder layers without their attention or MLP sub-layer (module-level depth pruning).

This file is also the modeling code of a module-pruned checkpoint: `pruning/checkpoint_code.py`
copies it into the checkpoint and appends a subclass of the original model class whose only change
is to call `skip_sublayers` after building the model. So it imports nothing but torch, and uses
no transformers internals: it has to load on any transformers 5 release.

config.json records what was removed:
- `skipped_sublayers`: one list per decoder layer of the units it lost, e.g. `[[], ["attn"], ["mlp"]]`
  (a per-layer list: removing whole layers later cuts it like `layer_types`);
- `sublayer_modules`: where the units live, e.g. `{"layers": "model.layers", "attn": ["self_attn",
  "input_layernorm"], "mlp": ["mlp", "post_attention_layernorm"]}`: the sub-layer first, then the
  norms only it uses (found by tracing the block when it was pruned).

A removed unit contributes nothing to the residual stream (`hidden + 0`, exact), its norms become
identities, and its weights are absent from the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

UNITS = ("attn", "mlp")


class SkippedAttention(nn.Module):
    """A removed attention sub-layer. It adds nothing, but still advances its KV-cache entry by one
    number per token (no keys or values): transformers reads the cache's length from layer 0 and the
    mask sizes from the first full or sliding layer, and each layer keeps its own `layer_idx`, so every
    cache entry must keep counting positions, with or without attention."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name changed within transformers 5
        if cache is not None:
            counter = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(counter, counter, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """A removed MLP sub-layer: adds nothing."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def stand_in(unit: str, layer_idx: int) -> nn.Module:
    return SkippedAttention(layer_idx) if unit == "attn" else SkippedMLP()


def skip_unit(block: nn.Module, unit: str, layer_idx: int, modules: dict) -> None:
    """Replace one unit of a decoder layer, in place: the sub-layer by its stand-in, its norms by identities."""
    main, *norms = modules[unit]
    setattr(block, main, stand_in(unit, layer_idx))
    for norm in norms:
        setattr(block, norm, nn.Identity())


def skip_sublayers(model: nn.Module, config) -> None:
    """Apply the config's `skipped_sublayers` to a freshly built model (what the checkpoint's class does)."""
    skipped = getattr(config, "skipped_sublayers", None)
    if not skipped:
        return
    modules = config.sublayer_modules
    layers = model.get_submodule(modules["layers"])
    if len(skipped) != len(layers):
        raise ValueError(f"config.skipped_sublayers lists {len(skipped)} layers, the model has {len(layers)}")
    for index, (block, units) in enumerate(zip(layers, skipped, strict=True)):
        for unit in units:
            skip_unit(block, unit, index, modules)
