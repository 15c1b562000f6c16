"""Failure handling without launching a run: RNG files that load with weights_only, checkpoints whose
files are not whole, DataLoader workers that outlive a stop signal, the watchdog naming a late rank,
the universal conversion under a lock."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from data.loader import GlobalBatchLoader
from tests.fixtures import ROOT, without_distributed_env
from training import stop_signals
from training.checkpoint import METADATA, CheckpointStore, capture_rng, restore_rng
from training.distributed import clear_stale_build_locks, free_port
from training.run_dir import tag_for
from training.watchdog import StepWatchdog


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(2).tolist(), torch.rand(2).tolist())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(2).tolist(), torch.rand(2).tolist()) == expected


def committed(directory, step: int, files: dict[str, bytes]):
    path = directory / tag_for(step)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    (path / METADATA).write_text(json.dumps({"step": step, "world_size": 2,
                                             "files": {name: len(content) for name, content in files.items()}}))
    return path


def test_a_checkpoint_with_a_missing_or_truncated_file_is_refused_for_the_one_before(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, keep_last=5, permanent_every=0)
    files = {"model.pt": b"m" * 100, "rng/rank_00001.pt": b"r" * 10}
    for step in (2, 4, 6):
        committed(tmp_path, step, files)
    (tmp_path / "latest").write_text(tag_for(6))
    assert store.resume_point() == (store.committed()[-1], [])
    os.truncate(tmp_path / tag_for(6) / "rng" / "rank_00001.pt", 4)
    (tmp_path / tag_for(4) / "model.pt").unlink()
    resume, refused = store.resume_point()
    assert resume.step == 2
    assert [(c.step, problem) for c, problem in refused] == [
        (6, "rng/rank_00001.pt has 4 bytes, its commit recorded 10"), (4, "model.pt is missing")]
    assert len(store.set_aside_refused()) == 2
    assert [c.step for c in store.committed()] == [2]
    assert (tmp_path / f"{tag_for(6)}.refused").is_dir() and (tmp_path / f"{tag_for(4)}.refused").is_dir()


class Numbers(torch.utils.data.Dataset):
    fingerprint = "numbers"

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([index])}


@pytest.mark.slow  # starts a DataLoader worker process (under a second)
def test_a_loader_worker_outlives_sigterm_and_sigusr1_from_outside(tmp_path):
    """Slurm signals the workers too: they must keep serving the rank, which decides when to stop."""
    loader = GlobalBatchLoader(Numbers(), global_batch=4, micro_batch=2, num_workers=1)
    before = {p.pid for p in psutil.Process().children()}  # earlier tests may leave helpers (compile workers)
    batches = iter(loader)
    first = [next(batches)["input_ids"].flatten().tolist() for _ in range(2)]
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 1
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(workers[0].pid, stop_signal)
    time.sleep(0.5)
    rest = [next(batches)["input_ids"].flatten().tolist() for _ in range(30)]
    assert workers[0].is_running()
    served = sorted(i for batch in first + rest for i in batch)
    assert served == list(range(64))  # one epoch, nothing lost
    del batches  # the loader shuts its worker down
    psutil.wait_procs(workers, timeout=30)


FAILING_RANK = """
import torch
from data.loader import GlobalBatchLoader
from tests.test_failure_units import Numbers
batches = iter(GlobalBatchLoader(Numbers(), global_batch=4, micro_batch=2, num_workers=2))
next(batches)
raise RuntimeError("a step failed")  # the traceback keeps the loader and its workers alive to the exit
"""


@pytest.mark.slow  # a Python process with two DataLoader workers
def test_a_run_that_fails_with_its_loader_workers_alive_shuts_them_down_at_exit():
    """What a rank does when a step raises: its error is the only traceback. The workers used to be killed at
    exit, and torch's SIGCHLD handler added "DataLoader worker ... is killed by signal: Killed"."""
    result = subprocess.run([sys.executable, "-c", FAILING_RANK], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1 and "RuntimeError: a step failed" in result.stderr, result.stderr
    assert "killed by signal" not in result.stderr and "Exception ignored" not in result.stderr


def test_exit_codes_of_the_outcomes():
    outcomes = ("completed", "preempted", "diverged", "data exhausted")
    assert [stop_signals.exit_code(o, 0) for o in outcomes] == [0, 75, 3, 0]


def wait_for_output(capsys, text: str, timeout: float = 60) -> str:
    """Everything printed until `text` appears (a generous deadline: the watchdog polls from its own thread)."""
    deadline, out = time.monotonic() + timeout, ""
    while text not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    return out


def test_watchdog_dumps_stacks_and_names_the_rank_behind(tmp_path, capsys):
    """Two ranks' watchdogs in one process (a shared run directory). Steps 1-3 (0.05 s) arm it; steps 4 and
    5 take 6x the median but less than min_seconds, so the armed watchdog must leave them alone; at step 6
    rank 1 is still fetching data while rank 0 waits in the step-end all-reduce."""
    ranks = [StepWatchdog(tmp_path, rank, 2, slow_factor=3, min_seconds=1.0, window=5, poll_s=0.02, gather_s=5)
             for rank in (0, 1)]
    for step in (1, 2, 3, 4, 5):
        for watchdog in ranks:
            watchdog.begin(step)
        time.sleep(0.05 if step <= 3 else 0.3)
        for watchdog in ranks:
            watchdog.end()
        if step >= 3:  # armed from here: >= 3 steps timed
            assert all(watchdog._limit() is not None for watchdog in ranks)
    for watchdog in ranks:
        watchdog.begin(6)
    ranks[0].mark(2, "step-end all-reduce")
    ranks[1].mark(1, "data")
    out = wait_for_output(capsys, "late")
    for watchdog in ranks:
        watchdog.close()
    assert "watchdog: step 6: rank(s) [1] late, still in data of micro-batch 1" in out
    folder = tmp_path / tag_for(6)
    assert sorted(p.name for p in folder.iterdir()) == ["rank_00000.txt", "rank_00001.txt"]
    status = json.loads((folder / "rank_00001.txt").read_text().splitlines()[0])
    assert (status["step"], status["micro_batch"], status["phase"]) == (6, 1, "data")
    assert status["elapsed_s"] >= 1.0  # late by min_seconds: 3 x the ~0.05 s median is less
    assert "test_watchdog_dumps_stacks_and_names_the_rank_behind" in (folder / "rank_00000.txt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(6)], "the normal steps, armed or not, leave nothing"


def test_watchdog_names_every_rank_when_all_are_slow_alike(tmp_path, capsys):
    watchdog = StepWatchdog(tmp_path, 0, 1, slow_factor=3, min_seconds=0.2, window=5, poll_s=0.02, gather_s=2)
    for step in (1, 2, 3):
        watchdog.begin(step)
        watchdog.end()
    watchdog.begin(4)
    watchdog.mark(0, "backward")
    out = wait_for_output(capsys, "every rank is in")
    watchdog.close()
    assert "watchdog: step 4: every rank is in backward of micro-batch 0" in out


def fake_conversion(log, seconds: float):
    """A stand-in for DeepSpeed's converter: notes who converted, takes `seconds`, leaves the target."""

    def convert(checkpoint, target):
        tmp = target.with_name(".tmp-" + target.name)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's leftovers, as the real one does
        tmp.mkdir()
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        tmp.rename(target)

    return convert


@pytest.mark.slow  # forks three processes (about a second)
def test_universal_conversion_runs_once_under_a_lock_and_restarts_after_a_killed_one(tmp_path, monkeypatch):
    import multiprocessing

    from training import checkpoint as checkpoints

    committed(tmp_path, 4, {"model.pt": b"m"})
    step4 = CheckpointStore(tmp_path, 0, 5, 0).committed()[0]
    log = tmp_path / "converted_by"
    context = multiprocessing.get_context("fork")
    monkeypatch.setattr(checkpoints, "convert_to_universal", fake_conversion(log, 60))
    killed = context.Process(target=checkpoints.ensure_universal, args=(step4, 1))
    killed.start()
    deadline = time.monotonic() + 120
    while not log.exists():
        assert killed.is_alive() and time.monotonic() < deadline, "the first conversion never started"
        time.sleep(0.05)
    killed.kill()  # dies holding the lock, midway
    killed.join()
    assert not (tmp_path / f"{tag_for(4)}.universal").exists()

    monkeypatch.setattr(checkpoints, "convert_to_universal", fake_conversion(log, 1))
    ranks = [context.Process(target=checkpoints.ensure_universal, args=(step4, 2)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
    assert [rank.exitcode for rank in ranks] == [0, 0]
    assert len(log.read_text().split()) == 2, "the killed attempt, then one conversion for both ranks"
    assert (tmp_path / f"{tag_for(4)}.universal").is_dir()


@pytest.mark.slow  # two launch/cpt.py processes
def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """A process killed while DeepSpeed JIT-builds an op leaves the builder's lock behind, and every later launch
    would wait on it forever. Locks older than any build are removed at the start; a build under way keeps its."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    killed, building = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (killed, building):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(killed, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks() == [killed]
    assert not killed.exists() and building.exists()
    assert f"removed {killed}, 60 minutes old: a build of deepspeed_shm_comm was killed" in capsys.readouterr().out


def test_ranks_that_cannot_meet_exit_2_within_the_timeout_naming_the_master(cpt_inputs, tmp_path):
    """The real launch/cpt.py as rank 0 and rank 1 of a world of 2 that never meet (each its own master port):
    rank 0 waits for a rank that never arrives, rank 1 for a master that never listens. Each gives up after
    distributed.timeout_minutes with exit code 2 and one line naming the master, and writes nothing."""
    ranks = {}
    started = time.monotonic()
    for rank in (0, 1):
        port = free_port()
        env = {**without_distributed_env(dict(os.environ)), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(ROOT / "launch" / "cpt.py"), f"model={cpt_inputs['model']}",
                   f"data.path={cpt_inputs['tokens']}", f"output_dir={tmp_path / f'run{rank}'}", "data.seq_len=64",
                   "global_batch=4", "micro_batch=2", "train_steps=2", "distributed.timeout_minutes=0.05"]
        ranks[rank] = port, subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
    for rank, (port, process) in ranks.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, out[-2000:] + err[-3000:]
        # our one line comes last; above it only c10d's own C++ log of the socket timeout, no Python traceback
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "Traceback" not in err, err[-3000:]
        assert f"127.0.0.1:{port}" in line and "distributed.timeout_minutes" in line
        assert ("could not join the master" if rank else "waited 0.05 min") in line
        assert not (tmp_path / f"run{rank}").exists()
    elapsed = time.monotonic() - started
    print(f"ranks that cannot meet: both exited 2 after {elapsed:.1f} s (timeout 3 s)")
    assert elapsed < 180  # 3 s of timeout plus start-up (imports, the plan's checks), not torch's 30 minutes
