"""Seeing a run: W&B (offline) and MLflow (local store) trackers, the profiler window, the OOM snapshot, curves.

The trackers run for real (wandb in offline mode, MLflow on its SQLite store in the run directory) and
are read back with their own readers: `wandb leet inspect --json` for W&B's .wandb files, MlflowClient
for MLflow, TensorBoard's EventAccumulator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.config import ConfigError, load_config
from tests.fixtures import ROOT, without_distributed_env
from training.config import CPTConfig, LoggingSection, LoRAConfig, ProfileSection
from training.curves import PANELS, plot_runs
from training.run_dir import tag_for
from training.tracking import check_trackers
from training.tracking.base import chart_name
from training.tracking.ledger import StepLedger

OFFLINE_WANDB = ["logging.wandb.mode=offline", "logging.wandb.project=shorten-tests"]


# ---- reading what each tracker holds, with its own reader --------------------------------------------------
def jsonl_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tracker name: {step: value}}: what every tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                assert record["step"] not in series.get(chart_name(key), {}), f"{key} twice at one step"
                series.setdefault(chart_name(key), {})[record["step"]] = float(value)
    return series


def wandb_series(run_dir: Path) -> tuple[set[str], dict[str, dict[int, float]], list[dict]]:
    """Every offline W&B run under run_dir/wandb, read by wandb's own reader: (run ids, {key: {step: value}},
    each launch's run config), failing on a step that two launches both sent."""
    ids, series, configs = set(), {}, []
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids.add(log.stem.removeprefix("run-"))
        result = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                                capture_output=True, text=True, check=True)
        for line in result.stdout.splitlines():
            record = json.loads(line)
            if record.get("type") == "run":
                configs.append(record["run"]["config"]["update"])
            if record.get("type") != "history":
                continue
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_"):
                    assert item["_step"] not in series.get(key, {}), f"W&B got {key} twice at step {item['_step']}"
                    series.setdefault(key, {})[item["_step"]] = value
    return ids, series, configs


def mlflow_series(run_dir: Path) -> tuple[list, dict[str, dict[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    series = {}
    for run in runs:
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            steps = [m.step for m in history]
            assert len(steps) == len(set(steps)), f"MLflow holds {key} twice at a step: {sorted(steps)}"
            series[key] = {m.step: m.value for m in history}
    return runs, series


def tensorboard_series(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# ---- the trackers inside the trainer (one process, in this one) --------------------------------------------
def cpt_config(inputs, run_dir: Path, *overrides: str) -> CPTConfig:
    return load_config(CPTConfig, None, [
        f"model={inputs['model']}", f"data.path={inputs['tokens']}", f"output_dir={run_dir}", "data.seq_len=64",
        "global_batch=4", "micro_batch=2", "data.num_workers=0", "train_steps=4", "validation.every_steps=2",
        "validation.sequences=4", "checkpoint.every_steps=0", "checkpoint.export_at_end=false", *overrides])


def test_every_tracker_gets_metrics_jsonl_and_a_failing_one_never_stops_training(cpt_inputs, tmp_path, monkeypatch,
                                                                                   single_process_group):
    """W&B's log raises at every call (a network down, a quota): one warning, training completes, the other
    trackers hold every value of metrics.jsonl. Profiling is off: no profiler object is ever made."""
    from training.cpt import build_cpt_trainer, plan_cpt
    from training.tracking.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_CONSOLE", "off")
    attempted = []

    def quota_exceeded(self, step, metrics):
        attempted.append(step)
        raise ConnectionError("W&B quota exceeded")

    def no_profiler(*args, **kwargs):
        raise AssertionError("a torch profiler was created with profiling off")

    monkeypatch.setattr(WandbTracker, "log", quota_exceeded)
    monkeypatch.setattr(torch.profiler, "profile", no_profiler)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", no_profiler)
    run_dir = tmp_path / "run"
    config = cpt_config(cpt_inputs, run_dir, "logging.trackers=[tensorboard,wandb,mlflow]", *OFFLINE_WANDB)
    trainer = build_cpt_trainer(config, plan_cpt(config, single_process_group), should_stop=lambda: False)
    assert trainer.profiler is None and trainer.oom is None
    with pytest.warns(RuntimeWarning) as caught:
        assert trainer.train() == "completed"
    failures = [str(w.message) for w in caught if "tracker wandb failed" in str(w.message)]
    assert len(failures) == 1 and "log step 0 (ConnectionError: W&B quota exceeded); training goes on" in failures[0]
    assert attempted == [0, 1, 2, 2, 3, 4, 4, 4], "every later call is still tried"  # val at 0, 2, 4; save at 4

    expected = jsonl_series(run_dir)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4] and sorted(expected["val/loss"]) == [0, 2, 4]
    runs, in_mlflow = mlflow_series(run_dir)
    assert in_mlflow == expected
    [run] = runs
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.params["optimizer.lr"] == "0.0001" and run.data.params["data.seq_len"] == "64"
    assert run.data.params["logging.trackers"] == "['tensorboard', 'wandb', 'mlflow']"
    in_tensorboard = tensorboard_series(run_dir)
    assert in_tensorboard.keys() == expected.keys()
    for key, values in expected.items():  # TensorBoard stores float32
        assert in_tensorboard[key] == pytest.approx(values, rel=1e-6), key
    assert (run_dir / "curves.png").stat().st_size > 10_000
    ids, in_wandb, [wandb_config] = wandb_series(run_dir)
    assert len(ids) == 1 and in_wandb == {}, "the W&B run exists; every log call to it failed"
    assert wandb_config["run_dir"] == str(run_dir.resolve()) and wandb_config["optimizer"]["lr"] == 0.0001
    saved = json.loads((run_dir / "trackers.json").read_text())
    assert saved["active"] == sorted([f"mlflow:{run.info.run_id}", f"wandb:{ids.pop()}"])


def test_lora_is_tracked_and_profiled_and_an_out_of_memory_step_dumps_a_snapshot(cpt_inputs, tmp_path, monkeypatch,
                                                                                 single_process_group):
    """LoRA shares the trainer: MLflow gets its metrics. profile.steps=[2, 3] with memory writes a Chrome trace
    of exactly those steps with their allocations; an OOM in step 4 dumps the CUDA memory snapshot (the CUDA
    calls replaced: no GPU here) before the error goes on."""
    from training.lora import build_lora_trainer, plan_lora
    from training.profiling import OOMSnapshot

    recorded, dumped = [], []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda path: dumped.append(path) or Path(path).write_bytes(b"snapshot"))
    run_dir = tmp_path / "lora"
    config = load_config(LoRAConfig, None, [
        f"model={cpt_inputs['model']}", f"output_dir={run_dir}", "data.source=embedded:alpaca_en_demo.json",
        "data.val_size=8", "data.cutoff_len=48", "train_steps=5", "global_batch=4", "micro_batch=2",
        "validation.every_steps=0", "export=last", "checkpoint.every_steps=0", "checkpoint.export_at_end=false",
        "logging.trackers=[mlflow]", "profile.steps=[2,3]", "profile.memory=true"])
    trainer = build_lora_trainer(config, plan_lora(config, single_process_group), should_stop=lambda: False)
    trainer.oom = OOMSnapshot(0, trainer.run.profile)  # what profile.oom_snapshot=true builds on a GPU
    assert recorded == [{"max_entries": 100_000}]
    train_step = trainer.train_step

    def out_of_memory_in_step_4(batches):
        if trainer.step + 1 == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(batches)

    trainer.train_step = out_of_memory_in_step_4
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert dumped == [str(run_dir / "profile" / "oom_rank0_step4.pickle")]

    [trace] = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "[memory]" for e in events), "allocations are recorded"
    assert "aten::mm" in {e.get("name") for e in events}
    _, in_mlflow = mlflow_series(run_dir)
    assert in_mlflow["train/loss"] == jsonl_series(run_dir)["train/loss"] and sorted(in_mlflow["train/loss"]) == [1, 2, 3]


# ---- a real launch, stopped and resumed from an earlier checkpoint ------------------------------------------
@pytest.mark.slow
def test_a_stopped_and_resumed_run_is_one_wandb_run_and_one_mlflow_run_without_duplicate_steps(cpt_inputs,
                                                                                                 tmp_path):
    """`python launch/cpt.py` (one process) stopped by SIGUSR1 after step 3; its last checkpoint is then lost,
    so the next launch resumes from step 2 and trains step 3 again: W&B (offline) and MLflow continue the
    same run and do not get step 3 twice. They hold metrics.jsonl: steps after 3 as the second launch logged
    them, steps up to 3 as the first did (losses, lr, gradient norm: equal, the resume is exact; timings:
    those of the first time a step ran)."""
    from tests.test_cpt import wait_for_step

    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "launch" / "cpt.py"), f"model={cpt_inputs['model']}",
               f"data.path={cpt_inputs['tokens']}", f"output_dir={run_dir}", "data.seq_len=64", "global_batch=4",
               "micro_batch=2", "data.num_workers=0", "train_steps=6", "validation.every_steps=3",
               "validation.sequences=4", "checkpoint.every_steps=2", "checkpoint.export_at_end=false",
               "logging.trackers=[tensorboard,wandb,mlflow]", *OFFLINE_WANDB]
    env = without_distributed_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_CONSOLE="off"))
    log = tmp_path / "first.log"  # a file, not a pipe: W&B's and MLflow's start-up output would fill a pipe
    with open(log, "w") as out:
        first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        wait_for_step(run_dir, 3, first)
        first.send_signal(signal.SIGUSR1)
        first.wait(timeout=300)
    output = log.read_text()
    stopped = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert first.returncode == 75 and stopped >= 3, output[-3000:]
    first_launch = jsonl_series(run_dir)
    _, before = mlflow_series(run_dir)
    assert sorted(before["train/loss"]) == list(range(1, stopped + 1))
    saved = json.loads((run_dir / "checkpoints" / tag_for(stopped) / "shorten_checkpoint.json").read_text())
    assert set(saved["trackers"]) == {"wandb", "mlflow"}

    # the newest checkpoint is lost (a node died while it was being copied, say): resume from the one before
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / tag_for(stopped))
    resumed_from = max(s for s in (2, 4) if s < stopped)
    (run_dir / "checkpoints" / "latest").write_text(tag_for(resumed_from))
    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(resumed_from)}" in second.stdout

    final = jsonl_series(run_dir)
    assert sorted(final["train/loss"]) == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens", "val/loss"):
        for step, value in first_launch[key].items():  # trained twice from the same state: the same values
            assert final[key][step] == value, (key, step)
    expected = {key: {**first_launch.get(key, {}), **{s: v for s, v in final.get(key, {}).items() if s > stopped}}
                for key in first_launch.keys() | final.keys()}
    ids, in_wandb, _ = wandb_series(run_dir)
    assert ids == {saved["trackers"]["wandb"]["id"]}, "one W&B run across both launches"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # `wandb sync` uploads both into it
    assert in_wandb == expected
    runs, in_mlflow = mlflow_series(run_dir)
    assert [r.info.run_id for r in runs] == [saved["trackers"]["mlflow"]["run_id"]] and in_mlflow == expected
    assert runs[0].info.status == "FINISHED"
    in_tensorboard = tensorboard_series(run_dir)
    assert sorted(in_tensorboard["train/loss"]) == [1, 2, 3, 4, 5, 6]


# ---- units: the ledger of sent steps, checks before launch, the curves -------------------------------------
def test_the_ledger_keeps_the_last_step_each_tracked_run_received_across_launches(tmp_path):
    path = tmp_path / "trackers.json"
    first = StepLedger(path, previous_last_step=None)  # a fresh run
    assert first.last_step("wandb:a") == -1 and first.last_step(None) == -1
    first.begin(["wandb:a"])
    second = StepLedger(path, previous_last_step=7)  # the first launch logged up to step 7, then died
    assert second.last_step("wandb:a") == 7 and second.last_step("wandb:new") == -1
    second.begin(["wandb:a"])
    third = StepLedger(path, previous_last_step=5)  # the second died at 5, resumed from an early checkpoint again
    assert third.last_step("wandb:a") == 7, "step 7 is still in the W&B run"
    third.begin(["wandb:b"])  # a new tracked run (a checkpoint from before the first one was started)
    assert StepLedger(path, previous_last_step=9).last_step("wandb:a") == 7
    assert StepLedger(path, previous_last_step=9).last_step("wandb:b") == 9
    path.write_text("{not json")
    assert StepLedger(path, previous_last_step=3).last_step("wandb:a") == -1


def test_a_tracker_that_cannot_start_is_left_out_and_its_run_kept_for_the_next_launch(tmp_path, monkeypatch):
    from training.metrics import MetricsLogger
    from training.run_dir import RunDir
    from training.tracking.mlflow_tracker import MlflowTracker

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MlflowTracker, "__init__", unreachable)
    logging = load_config(LoggingSection, None, ["trackers=[mlflow]"])
    with pytest.warns(RuntimeWarning, match="tracker mlflow could not start .ConnectionError: tracking server "
                                            "unreachable.; training goes on without it"):
        logger = MetricsLogger(RunDir(tmp_path), True, 4, 10, logging, {}, {"mlflow": {"run_id": "abc"}})
    logger.log(5, {"train.loss": 1.0})
    assert logger.tracker_states() == {"mlflow": {"run_id": "abc"}}, "the next checkpoint still names the run"
    logger.close("completed")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 5, "train.loss": 1.0}\n'
    assert (tmp_path / "curves.png").is_file()


def test_trackers_and_profiling_are_checked_before_launch(cpt_inputs, tmp_path, monkeypatch):
    import importlib.util

    from training.cpt import plan_cpt
    from training.distributed import WorldInfo

    world = WorldInfo(0, 0, 1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging.trackers has wandb but the wandb package is not installed: "
                                          r"pip install 'shorten\[wandb\]'"):
        plan_cpt(cpt_config(cpt_inputs, tmp_path / "a", "logging.trackers=[wandb]"), world)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings: nobody logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="no W&B credentials.*logging.wandb.mode=offline.*wandb sync"):
        check_trackers(load_config(LoggingSection, None, ["trackers=[wandb]"]))
    check_trackers(load_config(LoggingSection, None, ["trackers=[wandb,mlflow]", "wandb.mode=offline"]))
    with pytest.raises(ConfigError, match="is not one of 'tensorboard', 'wandb', 'mlflow'"):
        load_config(LoggingSection, None, ["trackers=[comet]"])
    for overrides, message in ((["steps=[3]"], r"profile.steps must be \[first, last\]"),
                               (["steps=[4,2]"], r"1 <= first <= last"), (["steps=[1,2]", "ranks=[]"], "at least one")):
        with pytest.raises(ConfigError, match=message):
            load_config(ProfileSection, None, overrides)
    with pytest.raises(ConfigError, match="profile.oom_snapshot records CUDA memory and this run is on cpu"):
        plan_cpt(cpt_config(cpt_inputs, tmp_path / "b", "profile.oom_snapshot=true"), world)
    with pytest.raises(ConfigError, match=r"profile.steps \[9, 10\] starts after the run's last step \(4\)"):
        plan_cpt(cpt_config(cpt_inputs, tmp_path / "c", "profile.steps=[9,10]"), world)
    with pytest.raises(ConfigError, match=r"profile.ranks \[5\]: this run has ranks 0..0 only"):
        plan_cpt(cpt_config(cpt_inputs, tmp_path / "d", "profile.steps=[1,2]", "profile.ranks=[5]"), world)
    assert not any((tmp_path / name).exists() for name in "abcd"), "refused before anything was written"


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "tra')


def test_curves_overlay_runs_with_their_names_against_steps_or_tokens(tmp_path):
    plain = [{"step": 0, "val.loss": 5.0, "zeroshot.average": 0.30}]
    plain += [{"step": s, "train.loss": 5 - 0.1 * s, "train.lr": 1e-4 * s, "train.tokens": 256 * s,
               "perf.tokens_per_s": 1000.0 + s, "train.grad_norm": 1.0 / s} for s in range(1, 5)]
    plain += [{"step": 4, "val.loss": 4.2, "zeroshot.average": 0.35}]
    distilled = [{"step": 0, "val.loss": 5.0, "val.loss.wiki": 5.5, "val.loss.c4": 4.5}]
    distilled += [{"step": s, "train.loss": 4 - 0.1 * s, "train.lr": 2e-4, "train.tokens": 512 * s,
                   "perf.tokens_per_s": 800.0} for s in range(1, 3)]
    distilled += [{"step": 2, "val.loss": 4.0, "val.loss.wiki": 4.6, "val.loss.c4": 3.7}]
    write_metrics(tmp_path / "cpt", plain)
    write_metrics(tmp_path / "distill", distilled)
    figure = plot_runs([tmp_path / "cpt", tmp_path / "distill"], tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = {ax.get_title(): ax for ax in figure.axes}
    assert list(axes) == [title for _, title in PANELS]

    def lines(title):
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes[title].lines}

    assert lines("training loss") == {"cpt": ([1, 2, 3, 4], [4.9, 4.8, 4.7, 4.6]),
                                      "distill": ([1, 2], [3.9, 3.8])}
    assert lines("held-out loss") == {"cpt": ([0, 4], [5.0, 4.2]), "distill": ([0, 2], [5.0, 4.0]),
                                      "distill: c4": ([0, 2], [4.5, 3.7]), "distill: wiki": ([0, 2], [5.5, 4.6])}
    assert lines("learning rate")["distill"] == ([1, 2], [2e-4, 2e-4])
    assert lines("tokens/s")["cpt"] == ([1, 2, 3, 4], [1001.0, 1002.0, 1003.0, 1004.0])
    assert lines("zero-shot accuracy (task average)") == {"cpt": ([0, 4], [0.30, 0.35])}
    assert list(lines("gradient norm")) == ["cpt"]
    colours = {line.get_label(): line.get_color() for ax in figure.axes for line in ax.lines}
    assert colours["cpt"] != colours["distill"] == colours["distill: wiki"]

    by_tokens = plot_runs([tmp_path / "cpt", tmp_path / "distill"], tmp_path / "tokens.png", ["a", "b"], x="tokens")
    held_out = {line.get_label(): list(line.get_xdata()) for line in by_tokens.axes[1].lines}
    assert held_out["a"] == [0, 1024] and held_out["b"] == [0, 1024]  # step 4 x 256, step 2 x 512
    assert by_tokens.axes[0].get_xlabel() == "tokens"

    result = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(tmp_path / "cpt"),
                             str(tmp_path / "distill"), f"output={tmp_path / 'cli.png'}", "x=tokens"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "cli.png").is_file(), result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(tmp_path / "cpt"),
                             str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and f"{tmp_path} has no metrics.jsonl" in result.stderr
