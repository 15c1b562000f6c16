"""Continued pretraining on real DeepSpeed: 2 CPU processes on gloo, a tiny Llama, real token shards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.config import load_config
from data.packed import PackedSequences
from tests.fixtures import ROOT, without_distributed_env
from training.checkpoint import METADATA, CheckpointStore
from training.config import CPTConfig, OptimizerSection
from training.distributed import WorldInfo, free_port
from training.run_dir import tag_for
from training.validation import ValidationLoss

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real DeepSpeed launches, up to three per test

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


SCRIPTS = ROOT / "tests" / "scripts"
ZEROSHOT = ["zeroshot.tasks=[wiki_cloze]", "zeroshot.include_path=embedded:tasks", "zeroshot.limit=12"]
ZEROSHOT_RECORD = "zeroshot_loglikelihoods.jsonl"  # written by tests/scripts/cpt_recording_zeroshot.py


def mixed(inputs) -> list[str]:
    """ZeRO-2 on Sheared-LLaMA's dynamic mixture of the data's two source sets: weights updated every 3 steps,
    the reference measured on the model itself before training. The reference run and every run compared
    with it use it, so their bitwise equality covers the mixture's resume on any world size."""
    return ["zero_stage=2", "data.mixture=dynamic", "data.dynamic.update_every=3",
            f"data.dynamic.reference_model={inputs['model']}"]


def reference_run(inputs) -> Path:
    """An uninterrupted ZeRO-2 run on 2 ranks on a dynamic mixture: the baseline that every interrupted run must
    reproduce. It also scores zero-shot once, at step 0 (recording every log-likelihood), which must not change
    its training."""
    run_dir = inputs["root"] / "reference"
    shared_memory = set(Path("/dev/shm").glob("deepspeed_*"))
    run_cpt(inputs, run_dir, *mixed(inputs), *ZEROSHOT, "zeroshot.every_steps=1000",
            script=SCRIPTS / "cpt_recording_zeroshot.py")
    (run_dir / "leaked_shared_memory.txt").write_text("".join(
        f"{path}\n" for path in sorted(set(Path("/dev/shm").glob("deepspeed_*")) - shared_memory)))
    return run_dir


@pytest.fixture(scope="module")
def reference(cpt_reference):
    return cpt_reference


def held_out_loss(model_dir: Path, inputs) -> float:
    """The logged validation loss recomputed in this process from a saved model: the same 8 held-out sequences,
    micro-batch 2, averaged per token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    held_out = PackedSequences(inputs["tokens"], 64, "validation")
    return ValidationLoss(held_out, 8, 2, WorldInfo(0, 0, 1), every=1)(model)["val.loss"]


def recorded_zeroshot(run_dir: Path) -> list[dict[tuple, tuple[float, bool]]]:
    """Per zero-shot evaluation of a run: {(context ids, continuation ids): (log-likelihood, greedy)}."""
    return [{(tuple(context), tuple(continuation)): (ll, bool(greedy)) for context, continuation, ll, greedy in
             json.loads(line)} for line in (run_dir / ZEROSHOT_RECORD).read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_zeroshot(inputs) -> tuple[float, dict[tuple, tuple[float, bool]]]:
    """wiki_cloze scored on the starting model by one process, through the same evaluation the trainer runs:
    the accuracy and every request's log-likelihood."""
    from data.embedded import CLOZE_TASK, resolve_tasks
    from training.evaluation.zeroshot import ShardedLM, ZeroShotEvaluation, load_tasks

    model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    scored = {}
    original = ShardedLM._loglikelihood_tokens

    def recording(self, requests, **kwargs):
        results = original(self, requests, **kwargs)
        scored.update({(tuple(r[1]), tuple(r[2])): (ll, greedy) for r, (ll, greedy) in zip(requests, results, strict=True)})
        return results

    evaluation = ZeroShotEvaluation(load_tasks([CLOZE_TASK], Path(resolve_tasks("embedded:tasks"))), [CLOZE_TASK],
                                    AutoTokenizer.from_pretrained(inputs["model"]), every=1, batch_size=8,
                                    max_length=64, limit=12)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardedLM, "_loglikelihood_tokens", recording)
        accuracy = evaluation(model)[f"zeroshot.{CLOZE_TASK}"]
    return accuracy, scored


def assert_zeroshot_at_step_0_as_one_process(run_dir: Path, one_process) -> None:
    """Ranks that split lm-eval's requests, pad the last share and all-gather give one process's scores."""
    accuracy, expected = one_process
    logged = {r["step"]: r for r in records(run_dir) if "zeroshot.average" in r}
    assert logged[0]["zeroshot.wiki_cloze"] == accuracy
    scored = recorded_zeroshot(run_dir)[0]
    assert scored.keys() == expected.keys() and len(scored) == 48  # 12 items x 4 choices
    for request, (ll, greedy) in scored.items():
        assert greedy == expected[request][1]
        assert ll == pytest.approx(expected[request][0], rel=1e-6, abs=1e-6), request


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
    assert AutoModelForCausalLM.from_pretrained(reference / "exports" / tag_for(STEPS)).config.num_hidden_layers == 4
    AutoTokenizer.from_pretrained(reference / "exports" / tag_for(STEPS))


def test_zero2_exports_its_final_weights_and_scores_zero_shot_as_one_process(reference, inputs,
                                                                             one_process_zeroshot):
    assert held_out_loss(reference / "exports" / tag_for(STEPS), inputs) == pytest.approx(
        val_losses(reference)[STEPS], rel=1e-6)
    assert_zeroshot_at_step_0_as_one_process(reference, one_process_zeroshot)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_with_falling_loss(inputs, tmp_path, stage, one_process_zeroshot):
    """ZeRO-1 runs under torchrun with activation checkpointing; ZeRO-3 under the deepspeed launcher
    also runs lm-eval zero-shot inside training: parameters are sharded there, nothing may hang, and the
    scores are one process's. Each export holds the final weights: it gives the logged held-out loss."""
    run_dir = tmp_path / "run"
    if stage == 3:
        run_cpt(inputs, run_dir, "zero_stage=3", "checkpoint.every_steps=0", *ZEROSHOT, "zeroshot.every_steps=5",
                script=SCRIPTS / "cpt_recording_zeroshot.py")
    else:
        run_cpt(inputs, run_dir, "zero_stage=1", "checkpoint.every_steps=0", "activation_checkpointing=true",
                launcher="torchrun")
    assert_learns(run_dir)
    assert held_out_loss(run_dir / "exports" / tag_for(STEPS), inputs) == pytest.approx(val_losses(run_dir)[STEPS],
                                                                                        rel=1e-6)
    if stage == 3:
        zeroshot = {r["step"]: r for r in records(run_dir) if "zeroshot.average" in r}
        assert sorted(zeroshot) == [0, 5, STEPS] and all(row["time.zeroshot_s"] > 0 for row in zeroshot.values())
        assert_zeroshot_at_step_0_as_one_process(run_dir, one_process_zeroshot)


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


def test_sigkill_while_saving_and_a_truncated_file_resume_from_the_newest_whole_checkpoint(inputs, reference,
                                                                                           tmp_path):
    """Rank 0 dies by SIGKILL halfway through writing step 6's optimizer states: `.tmp-step_6` is left and
    `latest` still names step 4. Then one rank file of step 4 loses its second half (a disk that lost it).
    The next start removes the half-written checkpoint, refuses step 4 (set aside as `.refused`), resumes from
    step 2 and trains on bitwise as the uninterrupted run."""
    run_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "cpt_killed_while_saving.py"
    run_cpt(inputs, run_dir, *mixed(inputs), script=script, script_args=("--kill-at-step=6",),
            expect=256 - signal.SIGKILL)  # the launcher exits with its dead child's -9
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f".tmp-{tag_for(6)}").is_dir(), "the half-written checkpoint is left as it died"
    assert (checkpoints / "latest").read_text().strip() == tag_for(4)
    victim = checkpoints / tag_for(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = victim.stat().st_size
    os.truncate(victim, size // 2)

    result = run_cpt(inputs, run_dir, *mixed(inputs))
    assert f"removed .tmp-{tag_for(6)}" in result.stdout
    assert not (checkpoints / f".tmp-{tag_for(6)}").exists()
    assert (f"checkpoint {checkpoints / tag_for(4)} is not whole (zero_pp_rank_1_mp_rank_00_optim_states.pt has "
            f"{size // 2:,} bytes, its commit recorded {size:,})") in result.stdout
    assert (checkpoints / f"{tag_for(4)}.refused").is_dir()  # kept for inspection
    assert f"resumed from {checkpoints / tag_for(2)}" in result.stdout
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


@pytest.fixture(scope="module")
def in_process_run(inputs, tmp_path_factory, single_process_group):
    """A 3-step run in this process (what `python launch/cpt.py` does) with checkpoints due by time only
    (`checkpoint.every_minutes=1`, no step interval) on a clock that advances 40 s per step, and a spy on every
    fsync and rename while it trains."""
    import training.trainer
    from training.cpt import build_cpt_trainer, plan_cpt

    run_dir = tmp_path_factory.mktemp("in-process") / "run"
    config = load_config(CPTConfig, None, [f"model={inputs['model']}", f"data.path={inputs['tokens']}",
                                           f"output_dir={run_dir}", *COMMON, "train_steps=3", "checkpoint.every_steps=0",
                                           "checkpoint.every_minutes=1"])
    clock, events = [0.0], []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.trainer, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                                perf_counter=time.perf_counter))
        trainer = build_cpt_trainer(config, plan_cpt(config, single_process_group), should_stop=lambda: False)
        train_step = trainer.train_step

        def forty_seconds_a_step(batches):
            clock[0] += 40.0
            return train_step(batches)

        trainer.train_step = forty_seconds_a_step
        patch.setattr(os, "fsync", spy_fsync)
        patch.setattr(os, "replace", spy_replace)
        assert trainer.train() == "completed"
    return SimpleNamespace(trainer=trainer, run_dir=run_dir, events=events)


def test_a_checkpoint_is_due_by_time_on_rank_0s_clock(in_process_run):
    """40, 80 s: a minute has passed at step 2, which is saved; 40 s later the run ends at step 3 (saved)."""
    checkpoints = in_process_run.run_dir / "checkpoints"
    assert [c.step for c in CheckpointStore(checkpoints, 0, 10, 0).committed()] == [2, 3]
    saved = [r["step"] for r in records(in_process_run.run_dir) if "time.checkpoint_s" in r]
    assert saved == [2, 3]


def test_commits_are_fsynced_before_they_are_renamed_and_pointed_to(in_process_run):
    """Every file and directory of a checkpoint is on the disk before the rename that commits it, the rename is
    on the disk before `latest` names it, and `latest` itself is written durably."""
    events, checkpoints = in_process_run.events, os.path.realpath(in_process_run.run_dir / "checkpoints")
    for step in (2, 3):
        tmp, final = Path(checkpoints) / f".tmp-{tag_for(step)}", Path(checkpoints) / tag_for(step)
        rename = events.index(("replace", str(tmp), str(final)))
        synced = {event[1] for event in events[:rename] if event[0] == "fsync"}
        # a file written in place and fsynced, or written under a temporary name, fsynced and renamed onto it
        synced |= {event[2] for event in events[:rename] if event[0] == "replace" and event[1] in synced}
        files = json.loads((final / METADATA).read_text())["files"]
        assert len(files) >= 3  # model states, optimizer states, RNG state
        for name in [*files, METADATA]:
            assert str(tmp / name) in synced, f"{name} of step {step} not fsynced before its commit"
        for directory in [final, *(path for path in final.rglob("*") if path.is_dir())]:
            assert str(tmp / directory.relative_to(final)) in synced, f"{directory} not fsynced before its commit"
        after = events[rename + 1:]
        pointed = next(i for i, event in enumerate(after) if event[:1] == ("replace",) and
                       event[2] == f"{checkpoints}/latest")
        assert ("fsync", checkpoints) in after[:pointed], "the rename is durable before latest names it"
        assert ("fsync", after[pointed][1]) in after[:pointed], "latest's new content is on the disk"
        assert after[pointed + 1] == ("fsync", checkpoints), "and so is latest's own rename"


def test_exported_checkpoint_has_the_engines_logits_and_offline_export_matches(in_process_run, tmp_path):
    trainer, run_dir = in_process_run.trainer, in_process_run.run_dir
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
    # launch/eval.py takes a training checkpoint as a model
    from training.evaluation.run import resolve_checkpoint

    exported = resolve_checkpoint(str(run_dir / "checkpoints" / tag_for(3)), tmp_path / "scratch")
    assert torch.equal(load_file(Path(exported) / "model.safetensors")[next(iter(at_end))], next(iter(at_end.values())))


def test_stop_signals_commit_and_the_restarts_equal_the_uninterrupted_run(inputs, reference, tmp_path):
    """With a DataLoader worker per rank. First SIGUSR1 to rank 1 only: the other rank learns it at the step's
    all-reduce, both commit and the launcher exits 75. The restart resumes; then SIGTERM to every process at
    once, launcher, ranks and workers, as Slurm preempts: each rank commits and exits 75 (the deepspeed
    launcher does not pass that on: each prints it). The last restart ends bitwise as the uninterrupted run."""
    run_dir, workers = tmp_path / "run", "data.num_workers=1"
    launcher = subprocess.Popen(cpt_command(inputs, run_dir, *mixed(inputs), workers), env=environment(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, launcher)
    rank_process(launcher, 1).send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == PREEMPTED, output[-3000:]
    first_stop = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().step
    assert 3 <= first_stop < STEPS - 2 and max(train_losses(run_dir)) == first_stop
    assert "[rank 1] SIGUSR1 to committed checkpoint" in output and "[rank 0] SIGUSR1" not in output

    launcher = subprocess.Popen(cpt_command(inputs, run_dir, *mixed(inputs), workers), env=environment(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(run_dir, first_stop + 1, launcher)
    ranks = [rank_process(launcher, rank) for rank in (0, 1)]
    assert all(rank.children() for rank in ranks), "each rank has its DataLoader worker"
    everyone = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    os.killpg(launcher.pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    psutil.wait_procs(everyone, timeout=60)
    assert not [p for p in everyone if p.is_running()], "every process of the run has exited"
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(first_stop)}" in output
    assert "DataLoader worker" not in output, output[-3000:]
    exits = re.findall(r"\[rank (\d)\] SIGTERM to committed checkpoint: ([\d.]+) s; exit code (\d+)", output)
    assert sorted((int(rank), int(code)) for rank, _, code in exits) == [(0, PREEMPTED), (1, PREEMPTED)], output[-3000:]
    stopped = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().step
    assert f"stop requested: checkpoint at step {stopped} committed" in output
    assert first_stop < stopped < STEPS and max(train_losses(run_dir)) == stopped
    print(f"signal to committed checkpoint: {max(float(s) for _, s, _ in exits):.2f} s "
          f"({sum(f.stat().st_size for f in (run_dir / 'checkpoints' / tag_for(stopped)).rglob('*')) / 1e6:.1f} MB)")

    result = run_cpt(inputs, run_dir, *mixed(inputs), workers)
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(stopped)}" in result.stdout
    assert train_losses(run_dir) == train_losses(reference)  # bitwise, every step
    assert mixture_weights(run_dir) == mixture_weights(reference)
    assert val_losses(run_dir) == val_losses(reference)
    resumed, uninterrupted = exported_weights(run_dir), exported_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_a_slow_rank_makes_every_rank_dump_its_stacks_and_is_named(inputs, tmp_path):
    run_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "cpt_with_a_slow_rank.py"
    # rank 1 stalls at step 5 until both ranks' stacks are written, however long the machine takes
    result = run_cpt(inputs, run_dir, "train_steps=5", "validation.every_steps=0", "checkpoint.every_steps=0",
                     "checkpoint.export_at_end=false", "watchdog.slow_factor=4", "watchdog.min_seconds=3",
                     "watchdog.window=5", script=script, script_args=("--slow=1:5",))
    stacks = run_dir / "watchdog" / tag_for(5)
    assert sorted(p.name for p in stacks.iterdir()) == ["rank_00000.txt", "rank_00001.txt"], result.stdout[-3000:]
    assert "in slow_train_step" in (stacks / "rank_00001.txt").read_text()  # where the late rank is stuck
    assert "watchdog: step 5: rank(s) [1] late, still in data of micro-batch 0" in result.stdout


def model_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_nonfinite_steps_are_skipped_and_three_in_a_row_exit_3(inputs, tmp_path):
    """The real launch/cpt.py with NaN activations at steps 3, 5, 6 and 7 and the default
    optimizer.max_skipped_steps (3): step 3 alone is skipped; 5, 6 and 7 in a row stop the run with exit code 3."""
    run_dir = tmp_path / "run"
    result = run_cpt(inputs, run_dir, "validation.every_steps=0", "checkpoint.every_steps=1", nprocs=1,
                     script=SCRIPTS / "cpt_with_nonfinite_steps.py", script_args=("--nan-steps=3,5,6,7",), expect=3)
    assert OptimizerSection().max_skipped_steps == 3  # the README's value, the default
    checkpoints = run_dir / "checkpoints"
    assert ("stopping: 3 optimizer steps in a row (steps 5..7) had a non-finite loss or gradient norm "
            f"(optimizer.max_skipped_steps=3). The last good checkpoint is {checkpoints / tag_for(6)}") in result.stdout
    skipped = {r["step"]: r["train.skipped_steps"] for r in records(run_dir) if "train.skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 4}
    assert [c.step for c in CheckpointStore(checkpoints, 0, 10, 0).committed()] == [1, 2, 3, 4, 5, 6]  # none of 7
    weights = {step: model_states(checkpoints / tag_for(step)) for step in (2, 3, 4, 6)}
    for name, before in weights[2].items():
        assert torch.equal(weights[3][name], before), f"the NaN step 3 applied an update to {name}"
        assert torch.equal(weights[6][name], weights[4][name]), f"a NaN step of 5-6 applied an update to {name}"
    assert not any(torch.equal(weights[4][name], weights[3][name]) for name in weights[3]), "step 4 trained"
