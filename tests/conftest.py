"""pytest set-up: offline hubs, the CPU suite kept off any GPU, the `gpu` marker, and the shared fixtures of
tests/fixtures.py.

The CPU suite must pass unchanged on a machine with GPUs: unless SHORTEN_GPU_TESTS=1, CUDA is hidden here,
before torch can look (the launchers and subprocesses of the tests inherit it), so nothing picks `cuda` or a
`cuda:1` that a one-GPU machine lacks. `make gpu-check` (tests/gpu_check.py) sets SHORTEN_GPU_TESTS=1 and runs
only the `gpu`-marked tests; in the CPU suite they are skipped with the reason.
"""

import os

GPU_SESSION = os.environ.get("SHORTEN_GPU_TESTS") == "1"
if not GPU_SESSION:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    """A GPU session runs the GPU tests only; the CPU suite skips them, saying why."""
    on_gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if GPU_SESSION:
        config.hook.pytest_deselected(items=[item for item in items if item not in on_gpu])
        items[:] = on_gpu
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: `make gpu-check` runs the gpu-marked tests on one "
                                   "(the CPU suite hides GPUs)")
    for item in on_gpu:
        item.add_marker(skip)
