"""Continued pretraining on real DeepSpeed: 2 CPU processes on gloo, a tiny Llama, real token shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.config import load_config
from tests.fixtures import ROOT, without_distributed_env
from training.checkpoint import CheckpointStore
from training.distributed import free_port
from training.run_dir import tag_for

pytestmark = pytest.mark.slow  # real DeepSpeed launches or the real SmolLM2

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 10
COMMON = ["data.seq_len=64", "global_batch=8", "micro_batch=2", "optimizer.lr=3e-3", "data.num_workers=0",
          "validation.every_steps=5", "validation.sequences=8", "checkpoint.every_steps=2",
          "checkpoint.keep_last=10", "checkpoint.permanent_every=0", f"train_steps={STEPS}"]
PREEMPTED = 75


@pytest.fixture(scope="module")
def inputs(cpt_inputs):
    return cpt_inputs


def cpt_command(inputs, run_dir: Path, *overrides: str, nprocs: int = 2,
                script: Path = ROOT / "launch" / "cpt.py", script_args: tuple[str, ...] = (),
                launcher: str = "deepspeed") -> list[str]:
    args = [f"model={inputs['model']}", f"data.path={inputs['tokens']}", f"output_dir={run_dir}", *COMMON,
            *overrides]
    if nprocs == 1:
        return [sys.executable, str(script), *script_args, *args]
    if launcher == "torchrun":
        return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port",
                str(free_port()), str(script), *script_args, *args]
    return [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(script),
            *script_args, *args]


def environment() -> dict[str, str]:
    return without_distributed_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))


def run_cpt(inputs, run_dir: Path, *overrides: str, expect: int = 0, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cpt_command(inputs, run_dir, *overrides, **kwargs), capture_output=True, text=True,
                            env=environment(), cwd=ROOT, timeout=600)
    if result.returncode != expect:
        zero3_exit_abort = "terminate called without an active exception" in result.stderr
        pytest.fail(f"exit code {result.returncode}, expected {expect}"
                    + (" (DeepSpeed ZeRO-3 aborted at process exit, see measured-here.md)" if zero3_exit_abort
                       else "") + f"\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train.loss"] for r in records(run_dir) if "train.loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val.loss"] for r in records(run_dir) if "val.loss" in r}


def mixture_weights(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("mixture.weight.")} for r in records(run_dir)
            if any(k.startswith("mixture.weight.") for k in r)}


def exported_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "exports" / tag_for(step) / "model.safetensors")


def assert_learns(run_dir: Path) -> None:
    losses, val = train_losses(run_dir), val_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)), "one record per step"
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < first - 0.5, losses
    assert val[STEPS] < val[0] - 0.5, val


def mixed(inputs) -> list[str]:
    """ZeRO-2 on Sheared-LLaMA's dynamic mixture of the data's two source sets: weights updated every 3 steps,
    the reference measured on the model itself before training. The reference run and every run compared
    with it use it, so their bitwise equality covers the mixture's resume on any world size."""
    return ["zero_stage=2", "data.mixture=dynamic", "data.dynamic.update_every=3",
            f"data.dynamic.reference_model={inputs['model']}"]


@pytest.fixture(scope="module")
def reference(inputs):
    """An uninterrupted ZeRO-2 run on a dynamic mixture: the baseline that every interrupted run must reproduce."""
    run_dir = inputs["root"] / "reference"
    shared_memory = set(Path("/dev/shm").glob("deepspeed_*"))
    run_cpt(inputs, run_dir, *mixed(inputs))
    (run_dir / "leaked_shared_memory.txt").write_text("".join(
        f"{path}\n" for path in sorted(set(Path("/dev/shm").glob("deepspeed_*")) - shared_memory)))
    return run_dir


def test_zero2_trains_logs_and_exports(reference, inputs):
    assert_learns(reference)
    # DeepSpeed's CPU all-reduce buffers (69 MB per rank) are unlinked by the run, not left in memory.
    assert (reference / "leaked_shared_memory.txt").read_text() == ""
    rows = records(reference)
    step = next(r for r in rows if r.get("step") == 3 and "train.loss" in r)
    for key in ("train.lr", "train.grad_norm", "train.tokens", "perf.tokens_per_s", "perf.data_wait_fraction",
                "perf.memory_gb"):
        assert key in step, key
    assert step["train.tokens"] == 3 * 8 * 64
    sets = ("RedPajamaC4", "RedPajamaWikipedia")
    for row in (r for r in rows if "val.loss" in r):  # per-set held-out loss beside the overall one
        assert all(f"val.loss.{name}" in row and f"val.ppl.{name}" in row for name in sets)
    weights = mixture_weights(reference)  # the dynamic mixture: logged at the start and at every update
    assert sorted(weights) == [0, 3, 6, 9] and all(sum(w.values()) == pytest.approx(1) for w in weights.values())
    assert weights[9] != weights[0] and (reference / "mixture_reference.json").is_file()
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    committed = [c.step for c in CheckpointStore(reference / "checkpoints", 0, 10, 0).committed()]
    assert committed == [2, 4, 6, 8, 10]
    assert (reference / "checkpoints" / "latest").read_text().strip() == tag_for(STEPS)
    model = AutoModelForCausalLM.from_pretrained(reference / "exports" / tag_for(STEPS))
    assert model.config.num_hidden_layers == 4
    AutoTokenizer.from_pretrained(reference / "exports" / tag_for(STEPS))


ZEROSHOT = ["zeroshot.every_steps=5", "zeroshot.tasks=[wiki_cloze]", "zeroshot.include_path=embedded:tasks",
            "zeroshot.limit=12"]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_with_falling_loss(inputs, tmp_path, stage):
    """ZeRO-1 runs under torchrun with activation checkpointing; ZeRO-3 under the deepspeed launcher
    also runs lm-eval zero-shot inside training: parameters are sharded there, nothing may hang."""
    extra = ZEROSHOT if stage == 3 else ["activation_checkpointing=true"]
    run_cpt(inputs, tmp_path / "run", f"zero_stage={stage}", "checkpoint.every_steps=0", *extra,
            launcher="torchrun" if stage == 1 else "deepspeed")
    assert_learns(tmp_path / "run")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "exports" / tag_for(STEPS)).num_parameters() > 0
    if stage == 3:
        zeroshot = {r["step"]: r for r in records(tmp_path / "run") if "zeroshot.average" in r}
        assert sorted(zeroshot) == [0, 5, STEPS]
        for row in zeroshot.values():
            assert 0 <= row["zeroshot.wiki_cloze"] <= 1 and row["time.zeroshot_s"] > 0


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before step {step}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in records(run_dir)):
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached in {timeout} s")


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if "cpt.py" in " ".join(child.cmdline()) and f"--local_rank={rank}" in child.cmdline():
            return child
    raise AssertionError(f"rank {rank} not found among the launcher's children")


def test_sigusr1_stop_and_restart_equals_uninterrupted_run(inputs, reference, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(cpt_command(inputs, run_dir, *mixed(inputs)), env=environment(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, launcher)
    rank_process(launcher, 1).send_signal(signal.SIGUSR1)  # one rank only: the others learn it at the all-reduce
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == PREEMPTED, output[-3000:]
    stopped = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().step
    assert 3 <= stopped < STEPS, stopped
    assert max(train_losses(run_dir)) == stopped

    result = run_cpt(inputs, run_dir, *mixed(inputs))
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(stopped)}" in result.stdout
    assert train_losses(run_dir) == train_losses(reference)  # bitwise, every step
    assert mixture_weights(run_dir) == mixture_weights(reference)
    assert val_losses(run_dir) == val_losses(reference)
    resumed, uninterrupted = exported_weights(run_dir), exported_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(inputs, reference, tmp_path):
    run_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "cpt_killed_while_saving.py"
    run_cpt(inputs, run_dir, *mixed(inputs), script=script, script_args=("--kill-at-step=6",),
            expect=256 - signal.SIGKILL)  # the launcher exits with its dead child's -9
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f".tmp-{tag_for(6)}").is_dir(), "the half-written checkpoint is left as it died"
    assert (checkpoints / "latest").read_text().strip() == tag_for(4)

    result = run_cpt(inputs, run_dir, *mixed(inputs))
    assert f"removed .tmp-{tag_for(6)}" in result.stdout
    assert f"resumed from {checkpoints / tag_for(4)}" in result.stdout
    assert not (checkpoints / f".tmp-{tag_for(6)}").exists()
    assert train_losses(run_dir) == train_losses(reference)


def test_world_size_2_to_1_continues_on_the_exact_next_samples(inputs, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("exports", "step_0000000[68]",
                                                                      "step_00000010"))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(4))
    result = run_cpt(inputs, run_dir, *mixed(inputs), nprocs=1)
    assert "world size 2 -> 1" in result.stdout
    assert (run_dir / "checkpoints" / f"{tag_for(4)}.universal").is_dir()
    assert "accumulation 4" in result.stdout  # same global batch of 8 from one rank
    after, before = train_losses(run_dir), train_losses(reference)
    for step in range(5, STEPS + 1):  # same samples and weights; only the reduction order differs
        assert after[step] == pytest.approx(before[step], rel=2e-5, abs=0), step
    # a different batch at the same weights would differ by far more than that tolerance
    assert abs(before[5] - before[6]) > 1e-3
    resumed, uninterrupted = mixture_weights(run_dir), mixture_weights(reference)  # updated on 1 rank from step 4
    for step in (6, 9):  # from held-out losses of weights that differ as little as the losses above
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=2e-5), step


def test_exported_checkpoint_has_the_engines_logits_and_offline_export_matches(inputs, tmp_path,
                                                                                single_process_group):
    from training.config import CPTConfig
    from training.cpt import build_cpt_trainer, plan_cpt

    run_dir = tmp_path / "run"
    config = load_config(CPTConfig, None, [f"model={inputs['model']}", f"data.path={inputs['tokens']}",
                                           f"output_dir={run_dir}", *COMMON, "train_steps=3"])
    plan = plan_cpt(config, single_process_group)
    trainer = build_cpt_trainer(config, plan, should_stop=lambda: False)
    assert trainer.train() == "completed"
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        engine_logits = trainer.engine.module(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(run_dir / "exports" / tag_for(3)).eval()
        assert torch.equal(exported(input_ids=ids).logits, engine_logits)

    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"),
                             f"checkpoint={run_dir / 'checkpoints' / tag_for(3)}", f"output_dir={offline}",
                             "dtype=fp32"], capture_output=True, text=True, env=environment(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    from_checkpoint, at_end = load_file(offline / "model.safetensors"), exported_weights(run_dir, 3)
    assert from_checkpoint.keys() == at_end.keys()
    for name in at_end:
        assert torch.equal(from_checkpoint[name], at_end[name]), name
    assert json.loads((offline / "export_info.json").read_text())["step"] == 3
    from training.evaluate import resolve_checkpoint  # launch/eval.py takes a training checkpoint as a model

    exported = resolve_checkpoint(str(run_dir / "checkpoints" / tag_for(3)), tmp_path / "scratch")
    assert torch.equal(load_file(Path(exported) / "model.safetensors")[next(iter(at_end))], next(iter(at_end.values())))


def test_sigterm_to_every_process_with_loader_workers_commits_and_resumes_exactly(inputs, reference, tmp_path):
    """As Slurm preempts: SIGTERM to the launcher, its ranks and their DataLoader workers at once."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(cpt_command(inputs, run_dir, *mixed(inputs), "data.num_workers=1"),
                                env=environment(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    wait_for_step(run_dir, 3, launcher)
    ranks = [rank_process(launcher, rank) for rank in (0, 1)]
    assert all(rank.children() for rank in ranks), "each rank has its DataLoader worker"
    everyone = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    os.killpg(launcher.pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    psutil.wait_procs(everyone, timeout=60)
    assert not [p for p in everyone if p.is_running()], "every process of the run has exited"
    assert "DataLoader worker" not in output, output[-3000:]
    for rank in (0, 1):  # the deepspeed launcher does not pass the ranks' exit codes on: they print them
        assert f"[rank {rank}] SIGTERM to committed checkpoint: " in output and "; exit code 75" in output
    stopped = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().step
    assert f"stop requested: checkpoint at step {stopped} committed" in output
    assert 3 <= stopped < STEPS and max(train_losses(run_dir)) == stopped
    seconds = [float(line.split("checkpoint: ")[1].split(" s")[0]) for line in output.splitlines()
               if "SIGTERM to committed checkpoint" in line]
    print(f"signal to committed checkpoint: {max(seconds):.2f} s "
          f"({sum(f.stat().st_size for f in (run_dir / 'checkpoints' / tag_for(stopped)).rglob('*')) / 1e6:.1f} MB)")

    result = run_cpt(inputs, run_dir, *mixed(inputs), "data.num_workers=1")
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(stopped)}" in result.stdout
    assert train_losses(run_dir) == train_losses(reference)
    resumed, uninterrupted = exported_weights(run_dir), exported_weights(reference)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_a_truncated_rank_file_refuses_the_latest_checkpoint_and_resumes_from_the_one_before(inputs, reference,
                                                                                          tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("exports", "step_0000000[8]", "step_00000010"))
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").write_text(tag_for(6))
    victim = checkpoints / tag_for(6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    result = run_cpt(inputs, run_dir, *mixed(inputs))
    assert (f"checkpoint {checkpoints / tag_for(6)} is not whole (zero_pp_rank_1_mp_rank_00_optim_states.pt has "
            f"{size // 2:,} bytes, its commit recorded {size:,})") in result.stdout
    assert f"resumed from {checkpoints / tag_for(4)}" in result.stdout
    assert (checkpoints / f"{tag_for(6)}.refused").is_dir()  # kept for inspection
    assert train_losses(run_dir) == train_losses(reference)


def test_a_slow_rank_makes_every_rank_dump_its_stacks_and_is_named(inputs, tmp_path):
    run_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "cpt_with_a_slow_rank.py"
    result = run_cpt(inputs, run_dir, "train_steps=6", "validation.every_steps=0", "checkpoint.every_steps=0",
                     "checkpoint.export_at_end=false", "watchdog.slow_factor=4", "watchdog.min_seconds=3",
                     "watchdog.window=5", script=script, script_args=("--slow=1:5:12",))
    stacks = run_dir / "watchdog" / tag_for(5)
    assert sorted(p.name for p in stacks.iterdir()) == ["rank_00000.txt", "rank_00001.txt"], result.stdout[-3000:]
    assert "in slow_train_step" in (stacks / "rank_00001.txt").read_text()  # where the late rank is stuck
    assert "watchdog: step 5: rank(s) [1] late, still in data of micro-batch 0" in result.stdout


def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(inputs, tmp_path, single_process_group):
    from training.config import CPTConfig
    from training.cpt import build_cpt_trainer, plan_cpt

    run_dir = tmp_path / "run"
    config = load_config(CPTConfig, None, [f"model={inputs['model']}", f"data.path={inputs['tokens']}",
                                           f"output_dir={run_dir}", *COMMON, "validation.every_steps=0",
                                           "train_steps=8", "optimizer.max_skipped_steps=2"])
    plan = plan_cpt(config, single_process_group)
    trainer = build_cpt_trainer(config, plan, should_stop=lambda: False)
    poisoned = {3, 5, 6}  # step 3 alone is skipped; 5 and 6 are two in a row: the run stops
    weights_after = {}
    train_step = trainer.train_step

    def nan_batches_at_poisoned_steps(batches):
        weights_after[trainer.step] = [p.detach().clone() for p in trainer.engine.module.parameters()]
        return train_step(batches)

    def poison(module, args, output):  # a batch whose activations are NaN, as corrupt data would give
        return output * float("nan") if trainer.step + 1 in poisoned else output

    trainer.train_step = nan_batches_at_poisoned_steps
    trainer.engine.module.get_input_embeddings().register_forward_hook(poison)
    assert trainer.train() == "diverged"
    assert trainer.step == 6
    unchanged = [torch.equal(a, b) for a, b in zip(weights_after[2], weights_after[3], strict=True)]
    assert all(unchanged), "the NaN step applied no update"
    assert not any(torch.equal(a, b) for a, b in zip(weights_after[3], weights_after[4], strict=True))
    skipped = {r["step"]: r["train.skipped_steps"] for r in records(run_dir) if "train.skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}
    assert [c.step for c in CheckpointStore(run_dir / "checkpoints", 0, 10, 0).committed()] == [2, 4]
