"""Extending a run (`schedule.on_extend`): the re-planned learning rates, the refusal, exact resumption after it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from data.config import ConfigError, load_config
from training.checkpoint import CheckpointStore
from training.config import CPTConfig, ScheduleSection
from training.schedule import LRPlan, check_extension

FLOOR = 0.1  # min_lr_ratio's default


def cosine(peak: float, progress: float) -> float:
    return FLOOR + (peak - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_continue_decays_from_where_the_run_was_to_the_floor_at_the_new_end():
    config = ScheduleSection(warmup_steps=2)
    plan = LRPlan.initial(config, 10)
    reached = plan.multiplier(6)
    extended = plan.extended(6, 20, "continue", config)
    assert [extended.multiplier(s) for s in range(6)] == [plan.multiplier(s) for s in range(6)]
    for step in range(6, 20):  # no warmup; the last step (19) is at the floor
        assert extended.multiplier(step) == pytest.approx(cosine(reached, (step - 6) / (19 - 6)), abs=1e-12), step
    finished = plan.extended(10, 20, "continue", config)
    assert {round(finished.multiplier(s), 12) for s in range(10, 20)} == {FLOOR}, "a finished run stays at the floor"
    linear = LRPlan.initial(ScheduleSection(decay="linear", warmup_steps=0), 10).extended(
        4, 12, "continue", ScheduleSection(decay="linear"))
    start = 1.0 - (1.0 - FLOOR) * 4 / 9
    assert linear.multiplier(8) == pytest.approx(start - (start - FLOOR) * 4 / 7)


def test_rewarm_warms_up_from_where_the_run_was_to_the_peak_then_decays():
    plan = LRPlan.initial(ScheduleSection(warmup_steps=2), 10)
    reached = plan.multiplier(10)  # finished: the floor
    extended = plan.extended(10, 30, "rewarm", ScheduleSection(warmup_fraction=0.2))  # 20% of the 20 new steps
    expected = [reached + (1.0 - reached) * (i + 1) / 4 for i in range(4)]
    expected += [cosine(1.0, (step - 14) / (29 - 14)) for step in range(14, 30)]
    assert [extended.multiplier(s) for s in range(10, 30)] == pytest.approx(expected, abs=1e-12)
    again = LRPlan.from_state(json.loads(json.dumps(extended.state())))  # as a checkpoint carries it
    assert [again.multiplier(s) for s in range(30)] == [extended.multiplier(s) for s in range(30)]


def test_a_changed_total_needs_on_extend_and_never_goes_below_the_trained_steps():
    saved = LRPlan.initial(ScheduleSection(), 10).state()
    check_extension(saved, 6, 10, ScheduleSection(), "the checkpoint X")  # the same total: nothing to say
    check_extension(None, 6, 20, ScheduleSection(), "the checkpoint X")  # a checkpoint without a plan
    with pytest.raises(ConfigError, match=r"the checkpoint X was planned for 10 steps, this config asks for 20: set "
                                          r"schedule.on_extend=continue .* or schedule.on_extend=rewarm"):
        check_extension(saved, 6, 20, ScheduleSection(), "the checkpoint X")
    check_extension(saved, 6, 20, ScheduleSection(on_extend="rewarm"), "the checkpoint X")
    check_extension(saved, 6, 8, ScheduleSection(on_extend="continue"), "the checkpoint X")  # shorter, still ahead
    with pytest.raises(ConfigError, match="has trained 6 steps, more than the 5 this config asks for"):
        check_extension(saved, 6, 5, ScheduleSection(on_extend="continue"), "the checkpoint X")
    with pytest.raises(ConfigError, match="schedule.on_extend: 'restart' is not one of 'continue', 'rewarm'"):
        load_config(CPTConfig, None, ["train_steps=3", "schedule.on_extend=restart"])


def train(inputs, run_dir: Path, world, *overrides: str, stop_at: int | None = None) -> str:
    """A CPT run in this process (one rank): COMMON's tiny recipe (lr 3e-3), 4 sequences per step, checkpoints
    only on a stop and at the end."""
    from tests.test_cpt import COMMON
    from training.cpt import build_cpt_trainer, plan_cpt

    config = load_config(CPTConfig, None, [f"model={inputs['model']}", f"data.path={inputs['tokens']}",
                                           f"output_dir={run_dir}", *COMMON, "global_batch=4",
                                           "validation.every_steps=0", "checkpoint.every_steps=0",
                                           "logging.trackers=[]", *overrides])
    plan = plan_cpt(config, world)
    trainer = build_cpt_trainer(config, plan, should_stop=lambda: stop_at is not None and trainer.step >= stop_at)
    return trainer.train()


def steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train.lr" in r}


@pytest.mark.slow
def test_extending_a_run_replans_the_lr_records_it_and_resumes_exactly(cpt_inputs, tmp_path, single_process_group):
    """A run planned for 6 steps, stopped at 4, resumed for 10: refused without on_extend; continue and rewarm give
    the lr of a direct computation; an extended run stopped and resumed again equals the uninterrupted one."""
    from training.cpt import plan_cpt

    world, lr = single_process_group, 3e-3
    base = tmp_path / "base"
    assert train(cpt_inputs, base, world, "train_steps=6", stop_at=4) == "preempted"
    config = load_config(CPTConfig, None, [f"model={cpt_inputs['model']}", f"data.path={cpt_inputs['tokens']}",
                                           f"output_dir={base}", "data.seq_len=64", "global_batch=4", "micro_batch=2",
                                           "train_steps=10"])
    with pytest.raises(ConfigError, match=f"the checkpoint {base / 'checkpoints' / 'step_00000004'} was planned "
                                          "for 6 steps, this config asks for 10: set schedule.on_extend=continue"):
        plan_cpt(config, world)
    reached = cosine(1.0, 4 / 5)  # where the 6-step cosine was at step index 4

    runs = {}
    for mode, extra in (("continue", []), ("rewarm", ["schedule.warmup_steps=2"])):
        runs[mode] = tmp_path / mode
        shutil.copytree(base, runs[mode])
        assert train(cpt_inputs, runs[mode], world, "train_steps=10", f"schedule.on_extend={mode}", *extra) == \
            "completed"
    expected = {"continue": [cosine(reached, i / 5) for i in range(6)],  # indices 4..9, the last at the floor
                "rewarm": [reached + (1 - reached) / 2, 1.0] + [cosine(1.0, i / 3) for i in range(4)]}
    for mode, run_dir in runs.items():
        logged = steps(run_dir)
        assert [logged[s]["train.lr"] for s in range(1, 5)] == [steps(base)[s]["train.lr"] for s in range(1, 5)]
        assert [logged[s]["train.lr"] for s in range(5, 11)] == pytest.approx([lr * m for m in expected[mode]],
                                                                             rel=1e-9), mode
        assert {k: logged[5][k] for k in ("schedule.on_extend", "schedule.planned_steps", "schedule.total_steps")} \
            == {"schedule.on_extend": mode, "schedule.planned_steps": 6, "schedule.total_steps": 10}
        assert "schedule.on_extend" not in logged[6]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["schedule"]["on_extend"] == mode
        final = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().metadata()["schedule"]
        assert [(s["start"], s["total"], s["mode"]) for s in final] == [(0, 6, "initial"), (4, 10, mode)]

    stopped = tmp_path / "stopped"  # extended, stopped at step 7, resumed: the plan comes from the checkpoint
    shutil.copytree(base, stopped)
    assert train(cpt_inputs, stopped, world, "train_steps=10", "schedule.on_extend=continue", stop_at=7) == "preempted"
    assert train(cpt_inputs, stopped, world, "train_steps=10", "schedule.on_extend=continue") == "completed"
    uninterrupted = steps(runs["continue"])
    assert {s: (r["train.loss"], r["train.lr"]) for s, r in steps(stopped).items()} == \
        {s: (r["train.loss"], r["train.lr"]) for s, r in uninterrupted.items()}
    from tests.test_cpt import exported_weights

    for name, tensor in exported_weights(runs["continue"]).items():
        assert torch.equal(exported_weights(stopped)[name], tensor), name
