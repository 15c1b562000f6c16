"""Shared fixtures: tiny random models of several architectures and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from data.embedded import smollm2_path, text_path  # noqa: E402
from tests.tiny_models import ARCHITECTURES, make_tiny_model  # noqa: E402


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
