"""The GPU check's CPU side: the CPU suite never sees a GPU, the masking check can see a masking bug, and
`make gpu-check` (tests/gpu_check.py) says what it needs and smoke-runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from data.varlen import row_boundaries, varlen_collate
from tests.fixtures import ROOT
from tests.masking import TINY_CHECK_SEQ, TINY_CHECK_SHAPE, masking_check


def test_the_cpu_suite_never_sees_a_gpu():
    """conftest.py hides CUDA before torch looks, for this process and every launcher a test starts: on a GPU
    machine nothing here picks `cuda`, or `cuda:1` for a second rank on a one-GPU machine."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False"


def rows_as_documents(samples):
    """A masking bug: the flattened rows handed over as one document each, so documents see each other."""
    batch = varlen_collate(samples)
    rows, seq = len(samples), samples[0]["input_ids"].numel()
    return {**batch, **row_boundaries(rows, seq, torch.device("cpu"))}


def test_the_masking_check_catches_a_masking_bug():
    """The check bench_gpu.py and tests/test_gpu.py apply to every path, on the CPU's varlen kernel."""
    right = masking_check("varlen", torch.device("cpu"), torch.float32, shape=TINY_CHECK_SHAPE, seq_len=TINY_CHECK_SEQ)
    wrong = masking_check("varlen", torch.device("cpu"), torch.float32, shape=TINY_CHECK_SHAPE, seq_len=TINY_CHECK_SEQ,
                          collate_path=rows_as_documents)
    assert right.agrees and right.grad_error < 1e-4
    assert not wrong.agrees and wrong.grad_error > 0.1, wrong.summary()


@pytest.mark.slow
def test_gpu_check_says_what_it_needs_and_smoke_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py")], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "no CUDA GPU here" in result.stdout and "make gpu-wheels" in result.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["gpu"] is None and summary["tests"]["skipped"] == summary["tests"]["tests"] > 0
    varlen, liger = (summary["bench"]["results"][path] for path in ("varlen", "varlen+liger"))
    assert varlen["tokens_per_s"] > 0 and varlen["mfu"] is None and varlen["masking"]["agrees"]  # no MFU on a CPU
    assert "liger" in liger["refused"]
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.log", "gpu_tests.xml", "bench_gpu.json",
                                                     "gpu_check.json"}
