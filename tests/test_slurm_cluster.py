"""Smoke tests of the real single-node Slurm cluster (tests/slurm_cluster.py): batch, srun, requeue."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first may apt-install Slurm


def _wait_for_text(path, text, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s: "
                         f"{path.read_text() if path.exists() else '(no file)'!r}")


def test_batch_job_runs(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(f"--output={out}", "--wrap", "echo hello; hostname")
    assert slurm_cluster.wait_for(job, timeout=60) == "COMPLETED"
    assert out.read_text().splitlines()[0] == "hello"


def test_two_tasks_under_srun(slurm_cluster, tmp_path):
    out = tmp_path / "ranks.out"
    job = slurm_cluster.sbatch("--ntasks=2", f"--output={out}", "--wrap",
                               'srun bash -c "echo rank \\$SLURM_PROCID"')
    assert slurm_cluster.wait_for(job, timeout=60) == "COMPLETED", out.read_text()
    assert sorted(out.read_text().split("\n")[:-1]) == ["rank 0", "rank 1"]


def test_requeue_reruns_with_restart_count(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.out"
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/bash\necho "restart=${SLURM_RESTART_COUNT:-0}"\n'
                      'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 30; fi\n')
    job = slurm_cluster.sbatch(f"--output={out}", "--open-mode=append", str(script))
    assert slurm_cluster.wait_for(job, {"RUNNING"}, timeout=60) == "RUNNING"
    _wait_for_text(out, "restart=0")
    slurm_cluster.run("scontrol", "requeue", str(job))
    assert slurm_cluster.wait_for(job, timeout=120) == "COMPLETED"
    # The killed run's output also holds slurmstepd's "*** JOB n ... CANCELLED ... DUE TO JOB REQUEUE ***".
    lines = out.read_text().splitlines()
    assert [line for line in lines if line.startswith("restart=")] == ["restart=0", "restart=1"], lines
    assert slurm_cluster.restart_count(job) == 1
