"""What autograd keeps for one decoder block, per token: the measurement behind training/memory.py's
per-block coefficients (tests/test_memory.py on the CPU, tests/test_gpu.py on a GPU)."""

from __future__ import annotations

import torch

from pruning.layers import find_decoder_layers


def saved_bytes_per_token(model: torch.nn.Module, batch: dict, block: int = 1) -> float:
    """Bytes of the tensors autograd saves while block `block` runs forward, per token of the batch: each storage
    counted once, where it is first saved (tensors every block shares, such as RoPE's cos/sin or the document
    mask, belong to the first block), weights excluded (they are counted as weights)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, per_block, current = set(), {}, [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in weights:
            seen.add(storage.data_ptr())
            per_block[current[0]] = per_block.get(current[0], 0) + storage.nbytes()
        return tensor

    hooks = []
    for index, layer in enumerate(find_decoder_layers(model)[1]):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=index: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**batch, use_cache=False).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return per_block[block] / batch["input_ids"].numel()
