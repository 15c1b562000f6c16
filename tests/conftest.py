"""Shared fixtures: tiny random models of several architectures and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from data.embedded import smollm2_path, text_path  # noqa: E402

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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def books_path() -> Path:
    return text_path("books.jsonl")


@pytest.fixture(scope="session")
def wiki_path() -> Path:
    return text_path("wiki_demo.txt")


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size)).eval()
    with torch.no_grad():  # larger random weights so blocks differ clearly in importance
        for name, param in model.named_parameters():
            if "layers" in name and param.dim() > 1:
                param.mul_(1 + (hash(name) % 7) / 3)
    return model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A saved checkpoint (weights + the SmolLM2 tokenizer) per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ARCHITECTURES:
        model = make_tiny_model(arch, len(tokenizer))
        path = root / arch
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def calibration(tokenizer, books_path):
    from data.text import load_documents
    from pruning.calibration import sample_calibration

    return sample_calibration(load_documents(str(books_path)), tokenizer, 4, 32, seed=1234)
