"""Benchmark of the pruning criteria on the real SmolLM2-135M with the paper's calibration size.

1. PPL criterion: ours (cached block inputs, only blocks after the candidate run) against the
   paper's rebuild-and-run method, timed side by side in this run; prints the speed ratio, the
   block forwards each really ran (counted by a forward hook on every decoder block) and whether the
   two give the same scores (to 1e-5, the README's figure) and ranking.
2. Taylor criterion: peak memory of ours (gradients reduced and freed as they arrive) against
   the paper's way (gradients summed over the calibration samples, all held, reduced at the end),
   one sample per backward pass in both, each in a fresh process: the peak RSS while scoring, over the
   loaded model's RSS (the high-water mark is reset after loading, whose own transient peak is higher
   than either); both compute the scores, which must agree (to 1e-4, as the tests hold them).

The two sides of each comparison compute the same thing: if they disagree the benchmark exits with
code 1, after printing everything. The measured rows end in a markdown table in the README's format.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.embedded import smollm2_path, text_path  # noqa: E402
from data.text import load_documents  # noqa: E402
from pruning.calibration import sample_calibration  # noqa: E402
from pruning.layers import find_decoder_layers  # noqa: E402
from pruning.scores import ppl_scores, ppl_scores_rebuild  # noqa: E402

PPL_TOLERANCE, TAYLOR_TOLERANCE = 1e-5, 1e-4  # relative, as tests/test_scores.py holds them


def calibration_batch(tokenizer) -> torch.Tensor:
    return sample_calibration(load_documents(str(text_path("books.jsonl"))), tokenizer, 10, 128, seed=1234)


def counting_block_forwards(block_type: type):
    """A forward hook on every module (the paper's rebuilt models included) that counts decoder block calls."""
    count = [0]

    def hook(module, args, output):
        if type(module) is block_type:
            count[0] += 1

    return count, torch.nn.modules.module.register_module_forward_hook(hook)


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def bench_ppl() -> tuple[str, bool]:
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calibration = calibration_batch(tokenizer)
    _, layers = find_decoder_layers(model)
    n = len(layers)
    forwards, handle = counting_block_forwards(type(layers[0]))
    try:
        start = time.perf_counter()
        ours = ppl_scores(model, calibration, progress=False)
        ours_s, ours_forwards = time.perf_counter() - start, forwards[0]
        start = time.perf_counter()
        paper = ppl_scores_rebuild(model, calibration, progress=False)
        paper_s, paper_forwards = time.perf_counter() - start, forwards[0] - ours_forwards
    finally:
        handle.remove()

    same_ranking = sorted(range(n), key=ours.__getitem__) == sorted(range(n), key=paper.__getitem__)
    max_rel = max_relative_difference(ours, paper)
    agree = same_ranking and max_rel <= PPL_TOLERANCE
    print(f"PPL criterion, SmolLM2-135M ({n} blocks), 10 x 128 calibration tokens, {torch.get_num_threads()} threads")
    print(f"  rebuild-and-run (paper): {paper_s:7.1f} s   {paper_forwards} block forwards (counted)")
    print(f"  cached inputs (ours):    {ours_s:7.1f} s   {ours_forwards} block forwards (counted)")
    print(f"  speed-up: {paper_s / ours_s:.2f}x   same ranking: {same_ranking}   max relative PPL difference: "
          f"{max_rel:.1e} (must be <= {PPL_TOLERANCE:g})")
    print(f"  lowest-PPL blocks: {sorted(range(n), key=ours.__getitem__)[:8]}")
    row = (f"| PPL criterion, all {n} blocks | rebuild-and-run (paper): {paper_s:.1f} s, {paper_forwards} block "
           f"forwards | {ours_s:.1f} s, {ours_forwards} block forwards | {paper_s / ours_s:.2f}x faster, "
           + (f"same scores (max relative difference {max_rel:.0e}) and ranking |" if agree else
              "SCORES DIFFER |"))
    return row, agree


# Peak RSS of the work alone: loading the model peaks higher than the loaded model holds, so the process's
# high-water mark is reset after loading (Linux: "5" to /proc/self/clear_refs resets VmHWM) and read after.
_TAYLOR_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
from tests.benchmarks.bench_pruning import calibration_batch
from data.embedded import smollm2_path
from pruning.layers import find_decoder_layers
from pruning.scores import taylor_scores

def status_mb(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

path = smollm2_path()
model = AutoModelForCausalLM.from_pretrained(path).eval()
calibration = calibration_batch(AutoTokenizer.from_pretrained(path))
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
base = status_mb("VmRSS")
if {streamed}:
    scores = taylor_scores(model, calibration, batch_size=1)
else:  # the paper's code: gradients summed over the calibration batches, all held, reduced at the end
    for sample in calibration.split(1):
        model(input_ids=sample, labels=sample).loss.backward()
    _, layers = find_decoder_layers(model)
    scores = [sum(float((p.detach() * p.grad).abs().sum()) for name, p in block.named_parameters()
                  if name.endswith("weight")) for block in layers]
print(json.dumps({{"peak_mb": status_mb("VmHWM"), "before_mb": base, "scores": scores}}))
"""


def bench_taylor_memory() -> tuple[str, bool]:
    results = {}
    for name, streamed in (("all gradients held", False), ("streamed (ours)", True)):
        out = subprocess.run([sys.executable, "-c", _TAYLOR_CHILD.format(root=str(ROOT), streamed=streamed)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print("Taylor criterion, SmolLM2-135M, a fresh process each: peak RSS while scoring (reset after the load)")
    for name, r in results.items():
        print(f"  {name:20s} peak {r['peak_mb']:7.0f} MB   (+{r['peak_mb'] - r['before_mb']:.0f} MB over the loaded "
              f"model's {r['before_mb']:.0f} MB)")
    held, ours = (results[k]["peak_mb"] - results[k]["before_mb"] for k in results)
    max_rel = max_relative_difference(results["streamed (ours)"]["scores"], results["all gradients held"]["scores"])
    agree = max_rel <= TAYLOR_TOLERANCE
    print(f"  extra memory ratio (held / streamed): {held / max(ours, 1):.2f}x   max relative score difference: "
          f"{max_rel:.1e} (must be <= {TAYLOR_TOLERANCE:g})")
    row = (f"| Taylor criterion, extra peak memory over the loaded model | all gradients held: +{held:.0f} MB | "
           f"+{ours:.0f} MB | {held / max(ours, 1):.2f}x less" + (", same scores |" if agree else ", SCORES DIFFER |"))
    return row, agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", default="ppl,taylor", help="which comparisons to run (default: both)")
    benches = {"ppl": bench_ppl, "taylor": bench_taylor_memory}
    chosen = parser.parse_args().criteria.split(",")
    print(f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    rows, agreed = zip(*(benches[name]() for name in chosen), strict=True)
    print("\nREADME rows (Benchmarks table):\n| what | baseline | ours | ratio |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    if not all(agreed):
        print("error: the two sides of a comparison disagree (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
