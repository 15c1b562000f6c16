"""Find a decoder's Transformer blocks by introspection and remove some of them consistently.

Removing blocks from a Hugging Face model touches three things that must agree, or the checkpoint
will not reload or generate: the layer list, the config (`num_hidden_layers` and every per-layer
list such as `layer_types`) and each attention module's `layer_idx` (the KV-cache index).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class LayersNotFoundError(ValueError):
    """The model has no recognizable list of decoder blocks."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ModuleList holding the decoder blocks.

    The list is the ModuleList whose length equals `config.num_hidden_layers` and whose items hold
    an attention module; if several qualify (an encoder-decoder), the shallowest wins.
    """
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        raise LayersNotFoundError(
            f"{type(model).__name__} has no config.num_hidden_layers: only decoder-only Hugging Face "
            "models (LLaMA, Mistral, Qwen, Gemma, ...) can be depth-pruned"
        )
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0:
            if all(_has_attention(block) for block in module):
                candidates.append((name.count("."), name, module))
    if not candidates:
        raise LayersNotFoundError(
            f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            f"{num_layers} blocks with attention modules; depth pruning supports decoder-only models"
        )
    _, name, layers = min(candidates, key=lambda c: c[0])
    return name, layers


def _has_attention(block: nn.Module) -> bool:
    return any("attn" in name.lower() or "attention" in name.lower() for name, _ in block.named_children())


def _set_submodule(model: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, value)


def per_layer_config_keys(config: PretrainedConfig) -> list[str]:
    """Config attributes that hold one entry per layer (e.g. `layer_types`)."""
    num_layers = config.num_hidden_layers
    return [key for key, value in vars(config).items()
            if isinstance(value, (list, tuple)) and len(value) == num_layers and not key.startswith("_")]


def _cut_per_layer_config(config: PretrainedConfig, keep: Sequence[int]) -> None:
    """Keep only the entries of the kept blocks in every per-layer config list, in place."""
    for key in per_layer_config_keys(config):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)


def pruned_config(config: PretrainedConfig, keep: Sequence[int]) -> PretrainedConfig:
    """A copy of `config` describing only the kept blocks."""
    new = copy.deepcopy(config)
    _cut_per_layer_config(new, keep)
    return new


def kept_blocks(num_layers: int, drop: Sequence[int]) -> list[int]:
    """The blocks that stay when `drop` is removed; refuses out-of-range indices and removing all."""
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"block indices {bad} are out of range: the model has blocks 0..{num_layers - 1}")
    if len(set(drop)) >= num_layers:
        raise ValueError(f"cannot remove {len(set(drop))} of {num_layers} blocks: at least one must stay")
    return [i for i in range(num_layers) if i not in set(drop)]


def remove_blocks(model: PreTrainedModel, drop: Sequence[int]) -> list[int]:
    """Remove blocks in place, keeping config and `layer_idx` consistent. Returns the kept indices."""
    path, layers = find_decoder_layers(model)
    keep = kept_blocks(len(layers), drop)
    _cut_per_layer_config(model.config, keep)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _set_submodule(model, path, kept)
    return keep


def renamed_state_dict(model: nn.Module, keep: Sequence[int]) -> dict[str, torch.Tensor]:
    """The state dict of `model` without the dropped blocks, block indices renumbered."""
    path, _ = find_decoder_layers(model)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    state = {}
    for name, tensor in model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in new_index:
            state[name[: match.start(1)] + str(new_index[int(match.group(1))]) + name[match.end(1):]] = tensor
    return state


def rebuild_without(model: PreTrainedModel, drop: Sequence[int]) -> PreTrainedModel:
    """A fresh model built from the pruned config with the kept weights copied in.

    This is how the paper's code builds each candidate; we keep it as the reference the fast
    criterion is tested and benchmarked against.
    """
    _, layers = find_decoder_layers(model)
    keep = kept_blocks(len(layers), drop)
    config = pruned_config(model.config, keep)
    fresh = type(model)(config).to(dtype=model.dtype, device=model.device)
    fresh.load_state_dict(renamed_state_dict(model, keep), strict=True)
    return fresh.eval()


def block_parameter_counts(model: nn.Module) -> list[int]:
    _, layers = find_decoder_layers(model)
    return [sum(p.numel() for p in block.parameters()) for block in layers]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once); a quantized layer whose weights are packed into
    buffers (GPTQ's `qweight`) counts the in_features x out_features weights it stands for."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight"))
    return packed + sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
