import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pruning.layers import (
    LayersNotFoundError,
    find_decoder_layers,
    per_layer_config_keys,
    rebuild_without,
    remove_blocks,
)
from tests.tiny_models import ARCHITECTURES, TINY_LAYERS, FlatConfig, FlatModel, make_tiny_model

DROP = [1, 4, 5]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_layers_by_introspection(arch):
    model = make_tiny_model(arch, 300)
    path, layers = find_decoder_layers(model)
    assert path == "model.layers" and len(layers) == TINY_LAYERS


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(LayersNotFoundError, match="could not find the decoder layers"):
        find_decoder_layers(FlatModel(FlatConfig()))
    with pytest.raises(LayersNotFoundError, match="num_hidden_layers"):
        find_decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removal_keeps_config_and_layer_idx_consistent(arch):
    model = make_tiny_model(arch, 300)
    per_layer = {k: list(getattr(model.config, k)) for k in per_layer_config_keys(model.config)}
    if arch in ("qwen2", "gemma2"):
        assert "layer_types" in per_layer
    keep = remove_blocks(model, DROP)
    assert keep == [i for i in range(TINY_LAYERS) if i not in DROP]
    assert model.config.num_hidden_layers == len(keep) == len(model.model.layers)
    for key, values in per_layer.items():
        assert list(getattr(model.config, key)) == [values[i] for i in keep]
    for index, block in enumerate(model.model.layers):
        assert block.self_attn.layer_idx == index


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruned_checkpoint_reloads_and_generates_identically(arch, tmp_path):
    model = make_tiny_model(arch, 300)
    remove_blocks(model, DROP)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == TINY_LAYERS - len(DROP)
    prompt = torch.randint(0, 300, (2, 12))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
        from_disk = reloaded.eval().generate(prompt, use_cache=True, **kwargs)
        logits = model(prompt).logits
        logits_disk = reloaded(prompt).logits
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, from_disk)
    torch.testing.assert_close(logits, logits_disk, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rebuild_equals_in_place_removal(arch):
    model = make_tiny_model(arch, 300)
    rebuilt = rebuild_without(model, DROP)
    remove_blocks(model, DROP)
    prompt = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, rebuilt(prompt).logits, rtol=0, atol=0)


def test_cannot_remove_every_block():
    model = make_tiny_model("llama", 300)
    with pytest.raises(ValueError, match="at least one must stay"):
        remove_blocks(model, list(range(TINY_LAYERS)))
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [TINY_LAYERS])
