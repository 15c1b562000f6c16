"""pytest set-up: offline hubs, the CPU suite kept off any GPU, the `gpu` marker, and the shared fixtures of
tests/fixtures.py, and a disk check before each slow test.

The CPU suite must pass unchanged on a machine with GPUs: unless SHORTEN_GPU_TESTS=1, CUDA is hidden here,
before torch can look (the launchers and subprocesses of the tests inherit it), so nothing picks `cuda` or a
`cuda:1` that a one-GPU machine lacks. `make gpu-check` (tests/gpu_check.py) sets SHORTEN_GPU_TESTS=1 and runs
only the `gpu`-marked tests; in the CPU suite they are skipped with the reason.
"""

import os
import shutil
import tempfile

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


# A slow test writes up to ~4.5 GB: two checkpoints of SmolLM2 under ZeRO (2.1 GB each) beside a reference's.
MIN_FREE_GB_FOR_SLOW_TEST = 5.0


def pytest_runtest_setup(item):
    """Fail a slow test at once, saying why, when its temp disk cannot hold its checkpoints: otherwise it dies
    midway in DeepSpeed's save or a launcher's pipe with ENOSPC, and takes every later test with it."""
    if item.get_closest_marker("slow") is None:
        return
    where = item.config.getoption("basetemp") or tempfile.gettempdir()
    free_gb = shutil.disk_usage(where).free / 2**30
    if free_gb < MIN_FREE_GB_FOR_SLOW_TEST:
        pytest.fail(f"only {free_gb:.1f} GB free under {where}; this test writes up to "
                    f"{MIN_FREE_GB_FOR_SLOW_TEST:.0f} GB of checkpoints: free disk space, or point TMPDIR (or "
                    "--basetemp) at a larger disk", pytrace=False)
