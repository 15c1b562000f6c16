"""Benchmark of the pruning criteria on the real SmolLM2-135M with the paper's calibration size.

1. PPL criterion: ours (cached block inputs, only blocks after the candidate run) against the
   paper's rebuild-and-run method, timed side by side in this run; prints the speed ratio, the
   block computations each does, and whether the two give the same scores and ranking.
2. Taylor criterion: peak memory of ours (gradients reduced and freed as they arrive) against
   the paper's way (gradients summed over the calibration samples, all held, reduced at the end),
   one sample per backward pass in both, each in a fresh process (peak RSS).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.embedded import smollm2_path, text_path
from data.text import load_documents
from pruning.calibration import sample_calibration
from pruning.scores import ppl_scores, ppl_scores_rebuild


def calibration_batch(tokenizer) -> torch.Tensor:
    return sample_calibration(load_documents(str(text_path("books.jsonl"))), tokenizer, 10, 128, seed=1234)


def bench_ppl() -> None:
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calibration = calibration_batch(tokenizer)
    n = model.config.num_hidden_layers

    start = time.perf_counter()
    ours = ppl_scores(model, calibration, progress=False)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    paper = ppl_scores_rebuild(model, calibration, progress=False)
    paper_s = time.perf_counter() - start

    same_ranking = sorted(range(n), key=ours.__getitem__) == sorted(range(n), key=paper.__getitem__)
    max_rel = max(abs(a - b) / b for a, b in zip(ours, paper, strict=True))
    blocks_ours = n + sum(n - 1 - i for i in range(n))  # one full pass + the blocks after each candidate
    blocks_paper = n * (n - 1)
    print(f"PPL criterion, SmolLM2-135M ({n} blocks), 10 x 128 calibration tokens, {torch.get_num_threads()} threads")
    print(f"  rebuild-and-run (paper): {paper_s:7.1f} s   {blocks_paper} block forwards")
    print(f"  cached inputs (ours):    {ours_s:7.1f} s   {blocks_ours} block forwards")
    print(f"  speed-up: {paper_s / ours_s:.2f}x   same ranking: {same_ranking}   max relative PPL difference: {max_rel:.1e}")
    print(f"  lowest-PPL blocks: {sorted(range(n), key=ours.__getitem__)[:8]}")


_TAYLOR_CHILD = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, {root!r})
from tests.benchmarks.bench_pruning import calibration_batch
from data.embedded import smollm2_path
from pruning.scores import taylor_scores
path = smollm2_path()
model = AutoModelForCausalLM.from_pretrained(path).eval()
calibration = calibration_batch(AutoTokenizer.from_pretrained(path))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {streamed}:
    taylor_scores(model, calibration, batch_size=1)
else:  # the paper's code: gradients summed over the calibration batches, all held, reduced at the end
    for sample in calibration.split(1):
        model(input_ids=sample, labels=sample).loss.backward()
print(json.dumps({{"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "before_mb": base / 1024}}))
"""


def bench_taylor_memory() -> None:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    results = {}
    for name, streamed in (("all gradients held", False), ("streamed (ours)", True)):
        out = subprocess.run([sys.executable, "-c", _TAYLOR_CHILD.format(root=root, streamed=streamed)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print("Taylor criterion, SmolLM2-135M, peak RSS of a fresh process (model loaded first)")
    for name, r in results.items():
        print(f"  {name:20s} peak {r['peak_mb']:7.0f} MB   (+{r['peak_mb'] - r['before_mb']:.0f} MB over the loaded model)")
    held, ours = (results[k]["peak_mb"] - results[k]["before_mb"] for k in results)
    print(f"  extra memory ratio (held / streamed): {held / max(ours, 1):.2f}x")


if __name__ == "__main__":
    print(f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    bench_ppl()
    bench_taylor_memory()
