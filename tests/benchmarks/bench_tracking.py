"""Benchmark of experiment tracking's cost per training step: all trackers on against all off, side by side.

The demo's continued pretraining (configs/cpt/smollm2_demo.yaml: SmolLM2-135M with the demo's 7 blocks
removed, 23 left; seq 256, micro-batch 2, global batch 4 on 2 CPU ranks, ZeRO-2, fp32), with its
periodic validation, zero-shot and checkpoints off so that every loop iteration is a training step, run
alternately (off, on, off, on, ...) to spread the noise of a shared machine:

  off: `logging.trackers=[]` (metrics.jsonl only)
  on:  `logging.trackers=[tensorboard,wandb,mlflow]`, W&B offline, MLflow on its SQLite store

Each launch runs `launch/cpt.py` through this file (`--rank`), which times rank 0's
`MetricsLogger.log` calls (metrics.jsonl + the fan-out to the trackers) without changing them.
Reported per round and pooled, after the warm-up steps: the median loop iteration (time between
consecutive steps' records: the whole step as training sees it, including the trackers' background
work competing for the CPU), the ratio on/off - 1 against the 1% target, the round-to-round spread
of each variant (this machine's noise floor), and the time rank 0 spends inside the logging call
(the trackers' cost on the training thread, measured directly) as a share of a step. The one-time
costs (W&B and MLflow start-up, closing, curves.png) are the launches' wall time differences.
Printed, never asserted; exits non-zero only if a launch fails.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_cpt import launch  # noqa: E402  (2 CPU ranks under the deepspeed launcher)

DEMO_REMOVED_BLOCKS = [4, 9, 12, 13, 14, 17, 18]  # what `make demo` prunes from SmolLM2 (PPL, 20%)
STEPS, WARMUP, ROUNDS, TARGET = 8, 2, 2, 0.01
VARIANTS = {"off": ["logging.trackers=[]"],
            "on": ["logging.trackers=[tensorboard,wandb,mlflow]", "logging.wandb.mode=offline",
                   "logging.wandb.project=shorten-bench"]}


# ---- inside each rank: launch/cpt.py with its logging call timed --------------------------------------------
def timed_cpt(timings: Path, cpt_args: list[str]) -> None:
    from training.metrics import MetricsLogger

    calls = []
    log = MetricsLogger.log

    def timed(self, step, metrics):
        started = time.perf_counter()
        log(self, step, metrics)
        if self.enabled and "train.loss" in metrics:
            calls.append({"step": step, "at": started, "seconds": time.perf_counter() - started})

    MetricsLogger.log = timed
    sys.argv = [str(ROOT / "launch" / "cpt.py"), *cpt_args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        if calls:
            timings.write_text(json.dumps(calls))


# ---- the driver ----------------------------------------------------------------------------------------------
def build_inputs(work: Path) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.config import load_config
    from data.embedded import smollm2_path
    from data.prepare import PrepareConfig, prepare
    from pruning.layers import remove_blocks

    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    remove_blocks(model, DEMO_REMOVED_BLOCKS)
    model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(work / "model")
    prepare(load_config(PrepareConfig, None, ["inputs=[embedded:c4_demo.jsonl]", f"output_dir={work / 'tokens'}",
                                              f"tokenizer={work / 'model'}", "validation_fraction=0.1"]))
    return work / "model", work / "tokens"


def run(model: Path, tokens: Path, run_dir: Path, variant: str) -> dict:
    timings = run_dir.with_suffix(".json")
    wall_s = launch(Path(__file__).resolve(), [
        "--rank", str(timings), "--config", str(ROOT / "configs" / "cpt" / "smollm2_demo.yaml"), f"model={model}",
        f"data.path={tokens}", f"output_dir={run_dir}", f"train_steps={STEPS}", "validation.every_steps=0",
        "zeroshot.every_steps=0", "checkpoint.every_steps=0", "checkpoint.export_at_end=false", *VARIANTS[variant]],
        f"trackers {variant}")
    calls = json.loads(timings.read_text())
    assert [c["step"] for c in calls] == list(range(1, STEPS + 1)), calls
    return {"loop_s": [b["at"] - a["at"] for a, b in zip(calls, calls[1:], strict=False)][WARMUP - 1:],
            "log_s": [c["seconds"] for c in calls][WARMUP:], "wall_s": wall_s}


def report(runs: dict[str, list[dict]]) -> None:
    print(f"tracking overhead: the demo's CPT (SmolLM2-135M, 23 blocks, seq 256, global batch 4, 2 CPU ranks, "
          f"ZeRO-2, fp32); {ROUNDS} rounds (off, on) of {STEPS} steps, medians of steps {WARMUP + 1}..{STEPS}")
    print(f"  {'':28}{'loop s/step':>12}{'log ms/step':>13}{'launch wall s':>15}")
    for round_ in range(ROUNDS):
        for variant in VARIANTS:
            launched = runs[variant][round_]
            print(f"  round {round_ + 1} trackers {variant:<12}{statistics.median(launched['loop_s']):12.3f}"
                  f"{statistics.median(launched['log_s']) * 1e3:13.2f}{launched['wall_s']:15.1f}")
    pooled = {v: statistics.median(t for run in runs[v] for t in run["loop_s"]) for v in VARIANTS}
    logged = {v: statistics.median(t for run in runs[v] for t in run["log_s"]) for v in VARIANTS}
    spread = {v: max(statistics.median(r["loop_s"]) for r in runs[v]) / min(statistics.median(r["loop_s"])
                                                                           for r in runs[v]) - 1 for v in VARIANTS}
    ratio = pooled["on"] / pooled["off"] - 1
    direct = (logged["on"] - logged["off"]) / pooled["off"]
    print(f"  all rounds: loop {pooled['off']:.3f} s/step off, {pooled['on']:.3f} s/step on -> on/off - 1 = "
          f"{ratio:+.2%} (round-to-round spread: {spread['off']:.1%} off, {spread['on']:.1%} on: differences "
          "of that size are the machine, not the trackers)")
    print(f"  on the training thread: the logging call takes {logged['on'] * 1e3:.2f} ms on, {logged['off'] * 1e3:.2f} "
          f"ms off: the trackers add {(logged['on'] - logged['off']) * 1e3:.2f} ms = {direct:.3%} of a step -> "
          f"{'under' if direct < TARGET else 'OVER'} the {TARGET:.0%} target")
    one_time = statistics.median(r["wall_s"] for r in runs["on"]) - statistics.median(r["wall_s"] for r in runs["off"])
    print(f"  once per launch (W&B and MLflow start-up and close, curves.png are drawn in both): {one_time:+.1f} s")


def main() -> None:
    start = time.perf_counter()
    os.environ["WANDB_CONSOLE"] = "off"  # the launches inherit it: W&B leaves rank 0's console alone
    work = Path(tempfile.mkdtemp(prefix="shorten-bench-tracking-"))
    try:
        model, tokens = build_inputs(work)
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for round_ in range(ROUNDS):
            for variant in VARIANTS:
                runs[variant].append(run(model, tokens, work / f"{variant}-{round_}", variant))
        report(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=Path, default=None, help=argparse.SUPPRESS)  # a rank: time launch/cpt.py
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.rank is not None:
        timed_cpt(args.rank, rest)
    else:
        main()
