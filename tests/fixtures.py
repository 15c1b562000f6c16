"""The shared test fixtures and helpers: the real SmolLM2 and texts, tiny random models of several
architectures, a tiny Llama with real token shards, a loopback Slurm cluster, the process group.

`tests/conftest.py` re-exports the fixtures; tests import the helpers from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from transformers import AutoTokenizer

from data.embedded import smollm2_path, text_path
from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed
from tests.tiny_models import ARCHITECTURES, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]  # the project: entry scripts and recipes are found from here

# What the PPL criterion removes from SmolLM2-135M at 20% (configs/prune/smollm2_ppl_20.yaml, the official
# calibration sampler): pinned by tests/test_smollm2.py's prune run, used wherever a test needs that model.
SMOLLM2_PPL_20_REMOVED = [4, 12, 13, 14, 16, 17, 18]

# Set by .ci/run: there the cluster tests (Slurm, namespace nodes, multi-node) must run, so a missing
# capability (root, apt, a package, namespaces) is a failure with its reason instead of a green skip.
REQUIRE_CLUSTER_ENV = "SHORTEN_REQUIRE_CLUSTER"


def cluster_tests_required(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(REQUIRE_CLUSTER_ENV, "") not in ("", "0")


def cluster_unavailable(reason: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """A cluster test cannot run here: skipped with the reason on a developer's machine, failed on CI."""
    if cluster_tests_required(env):
        pytest.fail(f"{reason} ({REQUIRE_CLUSTER_ENV}=1: the cluster tests must run here, not skip)", pytrace=False)
    pytest.skip(reason)


def tiny_llama_with_tokens(root: Path, tokenizer, hidden_size: int = 64, layers: int = 4) -> Path:
    """A tiny Llama with `tokenizer` (tied embeddings, as SmolLM2) under root/model and real text tokenized
    with it (10% held out for validation) under root/tokens: the C4 sample and Wikipedia paragraphs, as the
    source sets RedPajamaC4 and RedPajamaWikipedia (named by file, as the demo names its sets)."""
    import json
    import textwrap

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data.config import load_config
    from data.prepare import PrepareConfig, prepare
    from data.text import load_documents

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4 if hidden_size >= 64 else 2,
                         num_key_value_heads=2 if hidden_size >= 64 else 1, max_position_embeddings=256,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    wiki = root / "wiki_paragraphs.jsonl"
    paragraphs = [p for doc in load_documents("embedded:wiki_demo.txt")[:10] for p in textwrap.wrap(doc, 2000)]
    wiki.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    prepare(load_config(PrepareConfig, None, [f"inputs=[embedded:c4_demo.jsonl,{wiki}]", f"output_dir={root / 'tokens'}",
                                              f"tokenizer={root / 'model'}", "validation_fraction=0.1", "num_workers=1",
                                              "set_by_file={'c4*': RedPajamaC4, 'wiki*': RedPajamaWikipedia}"]))
    return root


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


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """A real Slurm cluster on loopback for the whole session (installed with apt on first use when we
    are root); without Slurm and the means to install it the test is skipped (failed on CI)."""
    reason = ensure_slurm_installed()
    if reason is not None:
        cluster_unavailable(reason)
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(keep=request.session.testsfailed > 0)


@pytest.fixture(scope="session")
def cpt_inputs(tmp_path_factory, tokenizer):
    """A tiny Llama with SmolLM2's tokenizer and real C4 text shards."""
    root = tiny_llama_with_tokens(tmp_path_factory.mktemp("cpt"), tokenizer)
    return {"model": root / "model", "tokens": root / "tokens", "root": root}


@pytest.fixture(scope="session")
def cpt_reference(cpt_inputs) -> Path:
    """The uninterrupted 2-rank ZeRO-2 CPT run of tests/test_cpt.py (its `reference_run`), once per session:
    interrupted runs there, the Slurm job of tests/test_submit.py and the distilled run of tests/test_distill.py
    are compared with it."""
    from tests.test_cpt import reference_run

    return reference_run(cpt_inputs)


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_distributed_env(env: dict[str, str]) -> dict[str, str]:
    """An environment for a launcher or Slurm job started from a test: no torch.distributed identity."""
    return {k: v for k, v in env.items() if k not in DISTRIBUTED_ENV}


@pytest.fixture(scope="session")
def single_process_group():
    """torch.distributed as one process (what a plain `python launch/cpt.py` is), set up once per session:
    DeepSpeed caches its process groups, so the group is never torn down and made again. Its variables
    stay set (DeepSpeed's engine reads LOCAL_RANK); launchers started by tests drop them
    (`without_distributed_env`)."""
    from training.distributed import free_port, init_distributed, prepare_environment

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"})
    world = prepare_environment()
    init_distributed()
    return world
