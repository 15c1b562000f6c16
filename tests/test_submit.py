"""launch/submit.py against a real Slurm cluster on loopback (tests/slurm_cluster.py): CPU training
jobs with 2 tasks, requeue and USR1 mid-run with exact resumption, an array tokenization job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data.config import load_config
from data.prepare import PrepareConfig, prepare
from data.text import load_documents
from tests.fixtures import ROOT, without_distributed_env
from tests.slurm_cluster import DEAD_END_STATES, FINAL_STATES
from tests.test_cpt import train_losses, val_losses

SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
           "--time", "10:00", "--signal-seconds", "60"]
STEPS = 16


def cpt_recipe(cpt_inputs, path: Path, run_dir: Path) -> Path:
    """tests/test_cpt.py's reference run (2 ranks, ZeRO-2, the same model, data, dynamic mixture, batch and lr)
    for STEPS steps."""
    recipe = {"model": str(cpt_inputs["model"]), "output_dir": str(run_dir), "train_steps": STEPS,
              "global_batch": 8, "micro_batch": 2, "zero_stage": 2,
              "data": {"path": str(cpt_inputs["tokens"]), "seq_len": 64, "mixture": "dynamic",
                       "dynamic": {"update_every": 3, "reference_model": str(cpt_inputs["model"])}},
              "optimizer": {"lr": 3e-3}, "checkpoint": {"every_steps": 3, "every_minutes": 0},
              "validation": {"every_steps": 5, "sequences": 8}, "logging": {"trackers": []}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def submit(args: list[str], env: dict, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(SUBMIT + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def job_env_plain() -> dict:
    return without_distributed_env(dict(os.environ))


def job_env(cluster) -> dict:
    return without_distributed_env({**cluster.env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def test_dry_run_writes_a_requeueing_script(cpt_inputs, tmp_path):
    recipe = cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")
    result = submit(["cpt", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                     "--log-dir", str(tmp_path / "logs"), "global_batch=64"], job_env_plain())
    script = next((tmp_path / "logs").glob("*.sbatch")).read_text()
    assert script in result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@900", "#SBATCH --open-mode=append"):
        assert line in script.splitlines(), line
    assert "srun --wait=120" in script and "global_batch=64" in script
    assert 'if [ "$rc" -eq 75 ] || [ -n "$stop_signal" ]' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    bad = submit(["cpt", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--dry-run"],
                 job_env_plain(), expect=2)
    assert "global_batch 8 does not divide into micro_batch 2 x 16 processes" in bad.stderr


@pytest.mark.parametrize(("limit", "seconds"), [("45", 2700), ("10:00", 600), ("1:30:00", 5400),
                                               ("2-00:00:00", 172800), ("1-2", 93600), ("1-2:30", 95400),
                                               ("INFINITE", None)])
def test_slurm_time_limits_in_every_format(limit, seconds):
    from launch.submit import slurm_time_seconds

    assert slurm_time_seconds(limit) == seconds


def test_a_stop_warning_not_shorter_than_the_time_limit_is_refused(cpt_inputs, tmp_path):
    """Slurm would signal such a job at once and at every check after: each run would stop as it starts."""
    recipe = cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")
    result = submit(["cpt", "--config", str(recipe), "--gpus-per-node", "0", "--time", "10:00", "--dry-run",
                     "--log-dir", str(tmp_path / "logs")], job_env_plain(), expect=2)
    assert result.stderr.startswith("error: --signal-seconds 900 is not shorter than --time 10:00 (600 s)")
    assert not (tmp_path / "logs").exists()
    bad = submit(["cpt", "--config", str(recipe), "--time", "ten minutes", "--dry-run"], job_env_plain(), expect=2)
    assert "--time 'ten minutes' is not a Slurm time limit" in bad.stderr


def test_missing_sbatch_is_a_clear_error(cpt_inputs, tmp_path):
    recipe = cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")
    result = submit(["cpt", "--config", str(recipe), *CPU_JOB], {**job_env_plain(), "PATH": str(tmp_path)},
                    expect=2)
    assert result.stderr.startswith("error: sbatch not found on PATH")


@pytest.mark.slow  # starts the Slurm cluster
@pytest.mark.timeout(1800)  # the first test of a session to ask for Slurm may apt-install it
def test_too_many_gpus_and_a_refused_submission(slurm_cluster, cpt_inputs, tmp_path):
    recipe = cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")
    env = job_env(slurm_cluster)
    result = submit(["cpt", "--config", str(recipe), "--gpus-per-node", "2", "--tasks-per-node", "2"], env, expect=2)
    assert "--gpus-per-node 2 but partition (default) has 0 GPUs per node" in result.stderr
    result = submit(["cpt", "--config", str(recipe), *CPU_JOB, "--sbatch-arg=--mem=100000000"], env, expect=2)
    assert "error: Slurm refused" in result.stderr and "Requested node configuration is not available" in \
        result.stderr


def wait_for_step(run_dir: Path, step: int, running: Callable[[], bool] = lambda: True, timeout: float = 900) -> int:
    """Until the run has logged `step`; fails at once when `running()` says the job is over, else after a
    generous deadline (a loaded 2-core machine may queue, start and step slowly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists():
            steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        if not running():
            raise AssertionError(f"the job ended before step {step}")
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def job_running(cluster, job: str) -> Callable[[], bool]:
    return lambda: cluster.job_state(job) not in FINAL_STATES | DEAD_END_STATES


@pytest.fixture(scope="module")
def uninterrupted_slurm_run(slurm_cluster, cpt_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-cpt")
    recipe = cpt_recipe(cpt_inputs, root / "run.yaml", root / "run")
    job = submit(["cpt", "--config", str(recipe), *CPU_JOB, "--log-dir", str(root / "logs"), "--parsable"],
                 job_env(slurm_cluster)).stdout.strip()
    state = slurm_cluster.wait_for(job, timeout=600)
    log = next((root / "logs").glob("*.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    return root / "run", log


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_task_training_job_trains_as_the_deepspeed_launcher(uninterrupted_slurm_run, cpt_reference):
    """srun's tasks set up their process group from Slurm's environment; the deepspeed launcher's reference run
    (tests/test_cpt.py, 10 steps) sets it up from its own. Until the learning rates of the two part (the
    schedules' lengths differ: 16 steps here), every loss is bitwise the same; so is the held-out loss."""
    run_dir, log = uninterrupted_slurm_run
    assert "2 ranks x micro-batch 2 x accumulation 2" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference_rows = [json.loads(line) for line in (cpt_reference / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["train.lr"] for r in rows if "train.lr" in r}
    reference_lr = {r["step"]: r["train.lr"] for r in reference_rows if "train.lr" in r}
    parted = next(step for step in range(1, 12) if lr[step] != reference_lr.get(step))  # the first update that differs
    assert parted >= 2, (lr, reference_lr)
    losses, reference_losses = train_losses(run_dir), train_losses(cpt_reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, parted + 1):  # step k's loss is computed with the weights of updates 1 .. k-1
        assert losses[step] == reference_losses[step], step
    assert val_losses(run_dir)[0] == val_losses(cpt_reference)[0]
    assert sum(losses[s] for s in (STEPS - 1, STEPS)) / 2 < sum(losses[s] for s in (1, 2)) / 2 - 0.5, losses
    assert (run_dir / "exports" / f"step_{STEPS:08d}" / "model.safetensors").is_file()


def wait_for_restart(cluster, job: str, log_path: Path, restart: int, timeout: float = 600) -> None:
    """Until the requeued run `restart` has resumed from a checkpoint."""
    deadline = time.monotonic() + timeout
    while cluster.restart_count(job) < restart and time.monotonic() < deadline:
        time.sleep(0.5)
    marker = f"restart {restart} on"
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        if marker in text and "resumed from" in text.split(marker)[-1]:
            return
        time.sleep(0.5)
    raise AssertionError(f"run {restart} did not resume in {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_requeue_and_sigterm_to_every_process_resume_to_the_same_weights(slurm_cluster, cpt_inputs,
                                                                         uninterrupted_slurm_run, tmp_path):
    """With the recipes' DataLoader worker per rank: `scontrol requeue` (a job kill: SIGTERM to every
    process, SIGKILL after KillWait; the ranks commit and exit 75, Slurm requeues the job) and
    `scancel --signal=TERM --full` (every process, srun included, which SIGKILLs the tasks at once;
    the batch shell requeues the job and the rerun resumes from the last periodic checkpoint)."""
    recipe = cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")
    job = submit(["cpt", "--config", str(recipe), *CPU_JOB, "--log-dir", str(tmp_path / "logs"), "--parsable"],
                 job_env(slurm_cluster)).stdout.strip()
    running = job_running(slurm_cluster, job)
    wait_for_step(tmp_path / "run", 5, running)
    slurm_cluster.run("scontrol", "requeue", job)  # as a preemption would: SIGTERM to the job now
    log_path = next((tmp_path / "logs").glob("*.out"))
    wait_for_restart(slurm_cluster, job, log_path, 1)
    first_run = log_path.read_text().split("restart 1 on")[0]
    for rank in (0, 1):  # a job kill leaves KillWait (Slurm's default 30 s) between SIGTERM and SIGKILL to commit
        assert f"[rank {rank}] SIGTERM to committed checkpoint" in first_run, first_run[-3000:]
    wait_for_step(tmp_path / "run", 10, running)
    slurm_cluster.run("scancel", "--signal=TERM", "--full", job)
    assert slurm_cluster.wait_for(job, timeout=600) == "COMPLETED", log_path.read_text()[-4000:]
    log = log_path.read_text()
    assert "restart 2 on" in log and "SIGTERM (srun exit" in log and "requeueing job" in log
    assert log.count("resumed from") == 2 and "DataLoader worker" not in log
    resumed = load_file(tmp_path / "run" / "exports" / f"step_{STEPS:08d}" / "model.safetensors")
    reference = load_file(uninterrupted_slurm_run[0] / "exports" / f"step_{STEPS:08d}" / "model.safetensors")
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_array_tokenization_equals_a_single_process_run(slurm_cluster, cpt_inputs, tmp_path):
    documents = load_documents("embedded:c4_demo.jsonl")
    inputs = []
    for part in range(3):
        path = tmp_path / f"part-{part}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[part::3]))
        inputs.append(str(path))
    settings = {"inputs": inputs, "tokenizer": str(cpt_inputs["model"]), "validation_fraction": 0.1,
                "num_workers": 1}
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "array")}))
    result = submit(["prepare_data", "--config", str(tmp_path / "tok.yaml"), "--array", "3", "--gpus-per-node", "0",
                     "--cpus-per-task", "1", "--time", "10:00", "--log-dir", str(tmp_path / "logs"), "--parsable"],
                    job_env(slurm_cluster))
    array_job, merge_job = result.stdout.strip().split(",")
    assert slurm_cluster.wait_for(merge_job, timeout=600) == "COMPLETED", \
        "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))[-4000:]
    single = json.loads(prepare(load_config(PrepareConfig, None, [
        f"inputs=[{','.join(inputs)}]", f"tokenizer={cpt_inputs['model']}", "validation_fraction=0.1",
        f"output_dir={tmp_path / 'single'}"])).read_text())
    merged = json.loads((tmp_path / "array" / "manifest.json").read_text())
    assert merged["fingerprint"] == single["fingerprint"]
    assert merged["splits"] == single["splits"]


def dry_run_scripts(stdout: str) -> tuple[list[Path], list[str]]:
    """The scripts a dry run wrote, in submission order, and the sbatch command it shows for each."""
    scripts = [Path(line[4:]) for line in stdout.splitlines() if line.startswith("--- ")]
    commands = [line.removeprefix("would run: ") for line in stdout.splitlines() if line.startswith("would run: ")]
    return scripts, commands


def srun_line(script: Path) -> str:
    return next(line for line in script.read_text().splitlines() if "launch/" in line and "python" in line)


def test_chain_recipes_write_one_script_per_job_each_after_the_one_before(tmp_path):
    """The iterative 60% chain (prune, distil, prune, distil) and the teacher-correction chain, as dry runs:
    each job's script, the products of earlier jobs filled in, and each submission depending on the one before."""
    result = submit(["chain", "--config", "configs/chain/vicuna7b_ppl_60_iterative.yaml", "--dry-run",
                     "--log-dir", str(tmp_path / "iterative")], job_env_plain())
    scripts, commands = dry_run_scripts(result.stdout)
    names = [f"shorten-vicuna7b_ppl_60_iterative-{job}" for job in ("prune1", "distill1", "prune2", "distill2")]
    assert [path.name.rsplit("-", 2)[0] for path in scripts] == names
    assert commands == [f"sbatch --parsable {scripts[0]}"] + [
        f"sbatch --parsable --dependency=afterok:<id of {name}> {path}" for name, path in zip(names[:-1], scripts[1:], strict=True)]
    round2 = yaml.safe_load((ROOT / "configs" / "prune" / "vicuna7b_iter60_round2.yaml").read_text())["model"]
    expected = ["launch/prune.py --config configs/prune/vicuna7b_iter60_round1.yaml",
                "launch/cpt.py --config configs/cpt/vicuna7b_iter60_round1_distill.yaml model=outputs/vicuna7b_iter60_round1",
                f"launch/prune.py --config configs/prune/vicuna7b_iter60_round2.yaml model={round2}",
                "launch/cpt.py --config configs/cpt/vicuna7b_iter60_round2_distill.yaml model=outputs/vicuna7b_iter60_round2"]
    for script, command in zip(scripts, expected, strict=True):
        assert srun_line(script).endswith(command), srun_line(script)
    for script in scripts[0::2]:  # the prunes: one GPU, no requeue
        assert "#SBATCH --gpus-per-node=1" in script.read_text() and "--requeue" not in script.read_text()
    for script in scripts[1::2]:  # the distillations: 4 nodes of 8 GPUs, requeued on a stop
        assert {"#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue"} <= \
            set(script.read_text().splitlines())

    result = submit(["chain", "--config", "configs/chain/vicuna7b_ppl_20_teacher_correction.yaml", "--dry-run",
                     "--log-dir", str(tmp_path / "correction")], job_env_plain())
    scripts, commands = dry_run_scripts(result.stdout)
    assert len(scripts) == 2 and "--dependency=afterok:<id of shorten-vicuna7b_ppl_20_teacher_correction-correct>" \
        in commands[1]
    teacher = yaml.safe_load((ROOT / "configs" / "cpt" / "vicuna7b_ppl_20_distill_corrected.yaml").read_text())
    assert srun_line(scripts[0]).endswith("--config configs/cpt/vicuna7b_teacher_correction.yaml")
    assert srun_line(scripts[1]).endswith(f"distill.teacher={teacher['distill']['teacher']}")


def test_a_chain_naming_a_later_job_or_given_overrides_is_refused(tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"jobs": [
        {"name": "a", "stage": "prune", "config": "configs/prune/smollm2_ppl_20.yaml", "overrides": ["model=${b}"]},
        {"name": "b", "stage": "prune", "config": "configs/prune/smollm2_ppl_20.yaml"}]}))
    result = submit(["chain", "--config", str(chain), "--dry-run", "--log-dir", str(tmp_path / "logs")],
                    job_env_plain(), expect=2)
    assert "job a: 'model=${b}' names ${b}, which is not an earlier job of the chain (earlier jobs: none)" in \
        result.stderr
    result = submit(["chain", "--config", "configs/chain/vicuna7b_ppl_60_iterative.yaml", "--dry-run",
                     "train_steps=5"], job_env_plain(), expect=2)
    assert "chain takes no key=value overrides (train_steps=5)" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_chain_is_submitted_with_each_job_after_the_one_before(slurm_cluster, cpt_inputs, tmp_path):
    """On a real Slurm: held jobs, so nothing runs; Slurm records each dependency."""
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"jobs": [
        {"name": "prune", "stage": "prune", "config": "configs/prune/smollm2_ppl_20.yaml",
         "overrides": [f"model={cpt_inputs['model']}", f"output_dir={tmp_path / 'pruned'}"]},
        {"name": "train", "stage": "cpt", "config": str(cpt_recipe(cpt_inputs, tmp_path / "run.yaml", tmp_path / "run")),
         "overrides": ["model=${prune}"], "tasks_per_node": 2}]}))
    result = submit(["chain", "--config", str(chain), "--gpus-per-node", "0", "--cpus-per-task", "1", "--time",
                     "10:00", "--signal-seconds", "60", "--sbatch-arg=--hold", "--log-dir", str(tmp_path / "logs"),
                     "--parsable"], job_env(slurm_cluster))
    first, second = result.stdout.strip().split(",")
    try:
        assert slurm_cluster.show_job(first)["Dependency"] == "(null)"
        assert slurm_cluster.show_job(second)["Dependency"].startswith(f"afterok:{first}")
        assert f"model={tmp_path / 'pruned'}" in next((tmp_path / "logs").glob("*-train-*.sbatch")).read_text()
    finally:
        slurm_cluster.run("scancel", first, second)
