"""Tiny random-weight models of several architectures, for fast unit tests."""

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2")
TINY_LAYERS = 8


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        # sliding attention in the upper layers: a per-layer `layer_types` list that must be cut
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=3)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16, sliding_window=16)
    raise ValueError(arch)


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size)).eval()
    with torch.no_grad():  # larger random weights so blocks differ clearly in importance
        for name, param in model.named_parameters():
            if "layers" in name and param.dim() > 1:
                param.mul_(1 + (hash(name) % 7) / 3)
    return model


class FlatConfig(PretrainedConfig):
    """A model with `num_hidden_layers` but no list of blocks: depth pruning must refuse it."""

    model_type = "shorten-flat-test"

    def __init__(self, num_hidden_layers=2, **kwargs):
        super().__init__(**kwargs)
        self.num_hidden_layers = num_hidden_layers


class FlatModel(PreTrainedModel):
    config_class = FlatConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
