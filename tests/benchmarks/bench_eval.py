"""Benchmark of generation speed: the original SmolLM2-135M against its 20%-pruned version.

The pruned model comes from a prune run: by default this benchmark runs the pruning stage itself with
the demo's recipe (configs/prune/smollm2_ppl_20.yaml: SmolLM2 by the PPL criterion, 20% of the
parameters; about a minute here), or `--pruned DIR` times a checkpoint launch/prune.py wrote; the blocks
it removed are read from its pruning_report.json. Both are timed side by side in this run
with the paper's protocol (training.evaluation.latency.measure_generation: batch 1, 12-token prompt, exactly
128 new tokens, greedy with the KV cache, 10 warm-up + 20 timed runs), fp32, on the CPU (or the GPU
when there is one), alternately (original, pruned, original, pruned) to spread the noise of a
shared machine. The second round is skipped when the first took over 3 minutes (the whole run
would pass ~6 minutes); the output says how many rounds ran. OpenMP threads wait passively
(OMP_WAIT_POLICY=PASSIVE unless set): with the default spinning, one other busy process on this
2-core machine makes 2-thread decoding ~40x slower (2.9 s/token instead of ~0.07), which would
measure the scheduler, not the model.

Reported per model: mean latency (s), tokens/s, and the speed-up pruned/original in tokens/s, next
to three references: the block ratio 30/23, the per-token decode FLOP ratio (2 x matmul parameters
of the kept blocks + LM head, training.throughput.matmul_parameters) and the paper's figure for
20%-pruned LLaMA-7B on an H100 (53.7 -> 66.0 tokens/s = 1.23x). Peak GPU memory on a GPU. Timings
are printed, never asserted; exits non-zero only if a run fails. Ends with the README's row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: set before the import

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from data.config import load_config  # noqa: E402
from data.embedded import smollm2_path  # noqa: E402
from pruning.config import PruneConfig  # noqa: E402
from pruning.run import prune  # noqa: E402
from training.evaluation.latency import measure_generation  # noqa: E402
from training.throughput import matmul_parameters  # noqa: E402

RECIPE = ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml"  # the demo's pruning
PROTOCOL = dict(batch_size=1, input_tokens=12, new_tokens=128, warmup=10, runs=20)
PAPER_TOKENS_PER_S = (53.7, 66.0)  # LLaMA-7B original -> 20% pruned (PPL), H100, the paper's figure
SECOND_ROUND_IF_FIRST_UNDER_S = 180.0


def load(device: torch.device, path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)


def pruned_checkpoint(given: Path | None, scratch: Path) -> tuple[Path, dict]:
    """The pruned model to time and its pruning report: the one given, or the demo's pruning run now."""
    if given is None:
        start = time.perf_counter()
        given = prune(load_config(PruneConfig, RECIPE, [f"output_dir={scratch / 'pruned'}"])).output_dir
        print(f"  pruned with {RECIPE.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s")
    report = json.loads((Path(given) / "pruning_report.json").read_text())
    if report["model"] not in ("embedded:smollm2-135m", str(smollm2_path())):
        raise SystemExit(f"error: {given} was pruned from {report['model']}, not SmolLM2-135M")
    return Path(given), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of (original, pruned); default 2, or 1 if the first takes > 3 min")
    parser.add_argument("--pruned", type=Path, default=None,
                        help="a SmolLM2 checkpoint written by launch/prune.py (default: prune with "
                             f"{RECIPE.relative_to(ROOT)} now)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    with tempfile.TemporaryDirectory(prefix="shorten-bench-eval-") as scratch:
        pruned_dir, report = pruned_checkpoint(args.pruned, Path(scratch))
        models = {"original": load(device, smollm2_path()), "pruned": load(device, pruned_dir)}
    drop, criterion = report["removed"], report["criterion"]
    blocks = {name: m.config.num_hidden_layers for name, m in models.items()}
    matmul = {name: matmul_parameters(m) for name, m in models.items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    print(f"Generation, SmolLM2-135M fp32 on {where}: batch {PROTOCOL['batch_size']}, "
          f"{PROTOCOL['input_tokens']} prompt tokens, {PROTOCOL['new_tokens']} new tokens "
          f"(greedy, KV cache), {PROTOCOL['warmup']} warm-up + {PROTOCOL['runs']} timed runs per measurement")
    print(f"  pruned: blocks {drop} removed by {criterion} ({blocks['original']} -> {blocks['pruned']} blocks; "
          f"{report['param_reduction']:.1%} fewer parameters)")
    print(f"  load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    results: dict[str, list[dict]] = {name: [] for name in models}
    start = time.perf_counter()
    round_no = 0
    while True:
        round_no += 1
        round_start = time.perf_counter()
        for name, model in models.items():
            results[name].append(measure_generation(model, tokenizer, **PROTOCOL))
            r = results[name][-1]
            print(f"  round {round_no} {name:8s}: {r['latency_s']:.3f} s +- {r['latency_stdev_s']:.3f}, "
                  f"{r['tokens_per_s']:.2f} tokens/s", flush=True)
        round_s = time.perf_counter() - round_start
        if args.rounds is not None:
            if round_no >= args.rounds:
                break
        elif round_no >= 2 or round_s > SECOND_ROUND_IF_FIRST_UNDER_S:
            if round_no == 1:
                print(f"  round 1 took {round_s:.0f} s > {SECOND_ROUND_IF_FIRST_UNDER_S:.0f} s: "
                      "one round each only (full protocol kept)")
            break
    total_s = time.perf_counter() - start
    print(f"  load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{round_no} round(s) in {total_s:.0f} s")

    new_tokens = PROTOCOL["batch_size"] * PROTOCOL["new_tokens"]
    latency = {name: statistics.fmean(r["latency_s"] for r in rs) for name, rs in results.items()}
    speed = {name: new_tokens / latency[name] for name in models}
    print()
    kind = next(iter(results.values()))[0]["memory"]
    print(f"peak memory: {kind}" + ("" if torch.cuda.is_available() else
                                    " (on the CPU: both models are loaded in this one process, so it holds both)"))
    print("| model | blocks | matmul params | mean latency (s) | tokens/s | tokens/s per round "
          "| peak memory |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, rs in results.items():
        peaks = [r["peak_memory_gb"] for r in rs if r["peak_memory_gb"] is not None]
        peak = f"{max(peaks):.2f} GB" if peaks else "n/a"
        per_round = ", ".join(f"{r['tokens_per_s']:.2f}" for r in rs)
        print(f"| {name} | {blocks[name]} | {matmul[name] / 1e6:.1f}M | {latency[name]:.3f} | "
              f"{speed[name]:.2f} | {per_round} | {peak} |")

    measured = speed["pruned"] / speed["original"]
    per_round = ", ".join(f"{p['tokens_per_s'] / o['tokens_per_s']:.3f}"
                          for o, p in zip(results["original"], results["pruned"], strict=True))
    paper = PAPER_TOKENS_PER_S[1] / PAPER_TOKENS_PER_S[0]
    print()
    print("| speed-up pruned / original (tokens/s) | ratio |")
    print("|---|---:|")
    print(f"| measured, this run (per round: {per_round}) | {measured:.3f}x |")
    print(f"| block ratio {blocks['original']}/{blocks['pruned']} | "
          f"{blocks['original'] / blocks['pruned']:.3f}x |")
    print(f"| per-token decode FLOP ratio (2 x matmul params: {2 * matmul['original'] / 1e6:.0f}M / "
          f"{2 * matmul['pruned'] / 1e6:.0f}M) | {matmul['original'] / matmul['pruned']:.3f}x |")
    print(f"| paper, LLaMA-7B 20% pruned on an H100 ({PAPER_TOKENS_PER_S[0]} -> {PAPER_TOKENS_PER_S[1]} "
          f"tokens/s) | {paper:.3f}x |")
    print("\nREADME row (Benchmarks table):\n| what | baseline | ours | ratio |\n| --- | --- | --- | --- |")
    print(f"| generation, SmolLM2-135M fp32 {'GPU' if device.type == 'cuda' else 'CPU'}, paper protocol "
          f"({PROTOCOL['input_tokens']} in, {PROTOCOL['new_tokens']} out, bs {PROTOCOL['batch_size']}, "
          f"{PROTOCOL['warmup']} + {PROTOCOL['runs']} runs, {round_no} round(s)) | original, {blocks['original']} "
          f"blocks: {speed['original']:.2f} tokens/s | pruned by {criterion.upper()} ({report['param_reduction']:.1%} of "
          f"the parameters, blocks {drop}), {blocks['pruned']} blocks: {speed['pruned']:.2f} tokens/s | {measured:.2f}x (block ratio "
          f"{blocks['original'] / blocks['pruned']:.2f}x, decode FLOP ratio {matmul['original'] / matmul['pruned']:.2f}x; "
          f"the paper's LLaMA-7B on H100: {paper:.2f}x) |")


if __name__ == "__main__":
    print(f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    main()
