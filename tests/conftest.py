"""pytest set-up: offline hubs, and the shared fixtures of tests/fixtures.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures import (  # noqa: E402, F401  (fixtures are found by name)
    books_path,
    calibration,
    cpt_inputs,
    cpt_reference,
    single_process_group,
    slurm_cluster,
    smollm2_dir,
    tiny_model_dirs,
    tokenizer,
    wiki_path,
)
