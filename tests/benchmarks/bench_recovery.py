"""Benchmark: which way of training a pruned model back recovers the most, at equal steps and tokens?

SmolLM2-135M is pruned by the PPL criterion to 20% fewer parameters with the official calibration
sampler (configs/prune/smollm2_ppl_20.yaml, a real prune run: it removes blocks [4, 12, 13, 14, 16,
17, 18]), the demo corpus is tokenized with its tokenizer (configs/data/demo.yaml: the C4 sample
and Gutenberg books, 5% of the documents held out; wiki_demo.txt is never trained on), and every
variant below trains from the same pruned weights with the same data, seed and steps
(configs/cpt/smollm2_demo.yaml, 2 DeepSpeed CPU processes, zero-shot off). The runs alternate
(A B C, then C B A, ...) and repeat with a new seed per repeat (shared by the variants), so drift
in this shared machine's speed and the luck of one data order fall on every variant alike.

Measured per run: in distribution, the held-out loss of the training data's validation split at
the last step (val.ppl, and val.ppl.<set> where the data has named sets); out of distribution,
Wikipedia perplexity (the paper's 128-token protocol) and wiki_cloze accuracy (the embedded
last-word cloze task, 100 items) by launch/eval.py; the median step time and rank 0's peak memory
(resident set on the CPU: teacher included). Then the KL at a 128k vocabulary: full logits against
top-k, time and what each keeps of the teacher. Reported as measured, whichever way it comes out;
nothing is asserted. About 30 minutes on 2 CPU cores with the defaults (5 variants x 12 steps x 2
repeats; `--steps`/`--repeats` for longer runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.config import load_config
from data.embedded import resolve_model
from data.prepare import PrepareConfig, prepare
from pruning.config import PruneConfig
from training.distill import chunked_kl, top_k_kl
from training.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
TEACHER = resolve_model("embedded:smollm2-135m")
OFFICIAL_REMOVAL = [4, 12, 13, 14, 16, 17, 18]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()


VARIANTS = [
    Variant("plain CPT (next-token CE)"),
    Variant("distilled, full logits", (f"distill.teacher={TEACHER}",)),
    Variant("distilled, top-64 logits", (f"distill.teacher={TEACHER}", "distill.top_k=64")),
    # plain CPT reads the sets in their natural proportions (~4% C4 by tokens); the mixtures steer them
    Variant("static mixture, C4 and books 50/50", ("data.mixture={RedPajamaC4: 0.5, RedPajamaBook: 0.5}",)),
    Variant("dynamic mixture (Sheared-LLaMA), reference: the unpruned model",
            ("data.mixture=dynamic", "data.dynamic.update_every=5")),
]


def cpt(pruned: Path, tokens: Path, run_dir: Path, steps: int, seed: int, overrides: tuple[str, ...]) -> Path:
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "launch" / "cpt.py"), "--config", str(ROOT / "configs" / "cpt" / "smollm2_demo.yaml"),
               f"model={pruned}", f"data.path={tokens}", f"output_dir={run_dir}", f"train_steps={steps}",
               f"seed={seed}", f"data.seed={seed}", "zeroshot.every_steps=0", f"validation.every_steps={steps}",
               "validation.sequences=64", "checkpoint.every_steps=0", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"CPT failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    shutil.rmtree(run_dir / "checkpoints")  # 2 GB each; the export and metrics.jsonl are what is measured
    return sorted((run_dir / "exports").iterdir())[-1]


def run_summary(run_dir: Path, steps: int) -> dict[str, float]:
    """Held-out perplexities at step 0 and at the end, median step time (first step excluded), peak memory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("val.ppl") and record["step"] in (0, steps):
                summary[f"{key}@{record['step']}"] = value
    summary["step_s"] = statistics.median(r["perf.step_s"] for r in records if "perf.step_s" in r and r["step"] > 1)
    summary["memory_gb"] = max(r["perf.memory_gb"] for r in records if "perf.memory_gb" in r)
    return summary


def evaluate(models: dict[str, Path], output: Path) -> dict[str, dict]:
    """Wikipedia perplexity and wiki_cloze accuracy of each model, by the evaluation stage (configs/eval/demo.yaml)."""
    entries = ", ".join(f"{{name: '{name}', path: '{path}'}}" for name, path in models.items())
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), "--config",
                             str(ROOT / "configs" / "eval" / "demo.yaml"), f"models=[{entries}]",
                             f"output_dir={output}", "latency.batch_sizes=[]"], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = json.loads((output / "results.json").read_text())["models"]
    return {row["name"]: {"wiki_ppl": row["perplexity"]["wiki@128"],
                          "cloze": 100 * row["zeroshot"]["tasks"]["wiki_cloze"]["value"]} for row in rows}


def spread(values: list[float], digits: int = 2) -> str:
    """mean (min-max) over the repeats."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def recovery_table(runs: dict[str, list[dict]], baseline: dict[str, float], steps: int) -> str:
    sets = sorted({k.split("@")[0] for rows in runs.values() for row in rows for k in row if k.startswith("val.ppl.")})
    header = ["model", "held-out PPL (training data)", *[f"held-out {s.removeprefix('val.ppl.')}" for s in sets],
              "PPL wiki@128", "wiki_cloze acc", "step time s", "vs plain", "peak memory GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| " + " | ".join(["pruned 20%, before CPT", f"{baseline['val.ppl']:.2f}",
                                    *[f"{baseline.get(s, float('nan')):.2f}" for s in sets],
                                    f"{baseline['wiki_ppl']:.2f}", f"{baseline['cloze']:.1f}", "", "", ""]) + " |")
    plain = statistics.mean(r["step_s"] for r in next(iter(runs.values())))
    for name, rows in runs.items():
        step_s = [r["step_s"] for r in rows]
        cells = [f"+ {steps} steps, {name}", spread([r[f"val.ppl@{steps}"] for r in rows]),
                 *[spread([r[f"{s}@{steps}"] for r in rows]) for s in sets],
                 spread([r["wiki_ppl"] for r in rows]), spread([r["cloze"] for r in rows], 1), spread(step_s),
                 f"{statistics.mean(step_s) / plain:.2f}x", spread([r["memory_gb"] for r in rows])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_at_vocabulary(vocab: int = 128_256, tokens: int = 1024, k: int = 64, repeats: int = 3) -> str:
    """Forward and backward of the KL on random logits at a Llama-3-sized vocabulary: full (chunked) against
    top-k (the teacher's top k taken first, then the KL over them), fp32 on this CPU."""
    generator = torch.Generator().manual_seed(0)
    student = (2 * torch.randn(tokens, vocab, generator=generator)).requires_grad_()
    teacher = 2 * torch.randn(tokens, vocab, generator=generator)
    weights = torch.ones(tokens)

    def timed(step) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step().backward()
            times.append(time.perf_counter() - started)
            student.grad = None
        return statistics.median(times)

    full_s = timed(lambda: chunked_kl(student, teacher, weights))
    top_s = timed(lambda: top_k_kl(student, *teacher.topk(k, dim=-1), weights))
    micro = 2 * 2048  # micro-batch 2 x seq 2048, what a recipe's rank holds through the student's step
    full_bytes, top_bytes = micro * vocab * 2, micro * k * (2 + 8)  # bf16 logits; bf16 values + int64 indices
    return (f"KL at vocab {vocab:,}, {tokens} tokens, fp32, forward + backward (median of {repeats}): full "
            f"(chunked) {full_s:.3f} s, top-{k} {top_s:.3f} s (topk included), {full_s / top_s:.1f}x\n"
            f"teacher logits kept through the student's step at micro-batch 2 x seq 2048: full bf16 "
            f"{full_bytes / 2**30:.2f} GiB, top-{k} values + indices {top_bytes / 2**20:.1f} MiB "
            f"({full_bytes / top_bytes:,.0f}x less)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the pruned model, tokens and runs here; a rerun reuses what is finished there "
                             "(default: a temporary directory)")
    args = parser.parse_args()
    from pruning.run import prune

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-recovery-")))
        pruned = root / "pruned"
        if not pruned.is_dir():
            prune(load_config(PruneConfig, ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml",
                              [f"output_dir={pruned}"]))
        removed = json.loads((pruned / "pruning_report.json").read_text())["removed"]
        print(f"pruned: removed blocks {removed}" + ("" if removed == OFFICIAL_REMOVAL else
                                                     f" (the official sampler's are {OFFICIAL_REMOVAL})"), flush=True)
        tokens = root / "tokens"
        if not tokens.is_dir():
            prepare(load_config(PrepareConfig, ROOT / "configs" / "data" / "demo.yaml",
                                [f"tokenizer={pruned}", f"output_dir={tokens}"]))
        runs: dict[str, list[dict]] = {v.name: [] for v in VARIANTS}
        exports = {}
        for repeat in range(args.repeats):
            order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
            for index, variant in enumerate(order):
                run_dir = root / f"run-{args.steps}-{repeat}-{VARIANTS.index(variant)}"
                done = run_dir / "exports"
                exports[(variant.name, repeat)] = sorted(done.iterdir())[-1] if done.is_dir() else cpt(
                    pruned, tokens, run_dir, args.steps, 1234 + repeat, variant.overrides)
                runs[variant.name].append(run_summary(run_dir, args.steps))
                print(f"repeat {repeat + 1}/{args.repeats}, run {index + 1}/{len(order)}: {variant.name}: "
                      f"{runs[variant.name][-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
        models = {"unpruned SmolLM2-135M (the teacher)": Path(TEACHER), "pruned": pruned}
        models.update({f"{name} #{repeat}": path for (name, repeat), path in exports.items()})
        scores = evaluate(models, root / f"eval-{args.steps}-{time.strftime('%Y%m%d-%H%M%S')}")
        for (name, repeat), _ in exports.items():
            runs[name][repeat].update(scores[f"{name} #{repeat}"])
        first = runs[VARIANTS[0].name][0]
        baseline = {"val.ppl": first["val.ppl@0"], **scores["pruned"],
                    **{k.split("@")[0]: v for k, v in first.items() if k.startswith("val.ppl.") and k.endswith("@0")}}
        teacher = scores["unpruned SmolLM2-135M (the teacher)"]
        print(f"\n{time.strftime('%Y-%m-%d')}: SmolLM2-135M pruned 20% (blocks {removed}), {args.steps} CPT steps "
              f"of 4 x 256 tokens on 2 CPU ranks, {args.repeats} repeats (mean, min-max); the unpruned model: "
              f"PPL wiki@128 {teacher['wiki_ppl']:.2f}, wiki_cloze {teacher['cloze']:.1f}\n")
        print(recovery_table(runs, baseline, args.steps))
    print("\n" + kl_at_vocabulary())
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
