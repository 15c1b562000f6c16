"""Benchmarks of the data stage, each against a baseline measured side by side in this run.

1. Tokenization throughput (tokens/s) against `datasets`: load_dataset("json") + map(batched=True,
   num_proc=N) with the same tokenizer on the same files, for 1 and 2 workers.
2. Peak memory of tokenization on a corpus and on 4x that corpus (fresh process each, peak RSS).
3. Loader delivery rate per rank (seq 2048, micro-batch 2) against what one H100 consumes
   training a ~3B model (~20k tokens/s).
4. Resume cost: building the loader and fetching the first batch at consumed samples 1e3 vs 1e7.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.config import load_config  # noqa: E402
from data.embedded import smollm2_path, text_path  # noqa: E402
from data.loader import GlobalBatchLoader  # noqa: E402
from data.packed import PackedSequences  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.text import load_documents  # noqa: E402


def write_corpus(directory: Path, copies: int, files: int = 4) -> list[Path]:
    docs = load_documents(str(text_path("books.jsonl"))) + load_documents("embedded:c4_demo.jsonl") + \
        load_documents(str(text_path("wiki_demo.txt")))
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{i}.jsonl" for i in range(files)]
    handles = [open(p, "w") for p in paths]
    for copy in range(copies):
        for k, doc in enumerate(docs):
            handles[(k + copy) % files].write(json.dumps({"text": doc}) + "\n")
    for h in handles:
        h.close()
    return paths


def ours(paths: list[Path], out: Path, workers: int) -> tuple[float, int]:
    config = load_config(PrepareConfig, None, [f"inputs=[{','.join(map(str, paths))}]", f"output_dir={out}",
                                               f"num_workers={workers}", f"tokenizer={smollm2_path()}"])
    start = time.perf_counter()
    manifest = json.loads(prepare(config).read_text())
    return time.perf_counter() - start, manifest["splits"]["train"]["tokens"]


def baseline(paths: list[Path], workers: int, cache: Path) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache))
    tokenized = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=workers if workers > 1 else None,
                            remove_columns=["text"])
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return time.perf_counter() - start, tokens


_MEMORY_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from data.config import load_config
from data.prepare import PrepareConfig, prepare
config = load_config(PrepareConfig, None, ["inputs=[{inputs}]", "output_dir={out}", "num_workers=1",
                                           "tokenizer={tokenizer}"])
prepare(config)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def peak_memory(paths: list[Path], out: Path) -> float:
    code = _MEMORY_CHILD.format(root=str(ROOT), inputs=",".join(map(str, paths)), out=out, tokenizer=smollm2_path())
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="shorten-bench-data-"))
    try:
        paths = write_corpus(work / "corpus", copies=2)
        print("Tokenization, SmolLM2 tokenizer, real text (books, C4, Wikipedia)")
        for workers in (1, 2):
            ours_s, ours_tokens = ours(paths, work / f"ours-{workers}", workers)
            base_s, base_tokens = baseline(paths, workers, work / f"hf-cache-{workers}")
            print(f"  {workers} worker(s): ours {ours_tokens / ours_s:>10,.0f} tokens/s   datasets.map "
                  f"{base_tokens / base_s:>10,.0f} tokens/s   ratio {base_s / ours_s * ours_tokens / base_tokens:.2f}x")
            if workers == 1:
                single = ours_tokens / ours_s
        print(f"  scaling 1 -> 2 workers (ours): {ours_tokens / ours_s / single:.2f}x")

        small = write_corpus(work / "mem-1x", copies=1, files=1)
        large = write_corpus(work / "mem-4x", copies=4, files=1)
        one, four = peak_memory(small, work / "mem-out-1"), peak_memory(large, work / "mem-out-4")
        print(f"Tokenization peak RSS: corpus {one:.0f} MB, 4x corpus {four:.0f} MB, ratio {four / one:.3f}")

        dataset = PackedSequences(work / "ours-1", 2048)
        loader = iter(GlobalBatchLoader(dataset, global_batch=64, micro_batch=2, seed=0))
        next(loader)
        start = time.perf_counter()
        batches = 200
        for _ in range(batches):
            next(loader)
        rate = batches * 2 * 2048 / (time.perf_counter() - start)
        print(f"Loader delivery per rank (seq 2048, micro 2, 0 workers): {rate:,.0f} tokens/s = "
              f"{rate / 20_000:.0f}x what an H100 consumes training a ~3B model (~20k tokens/s)")

        def resume_cost(consumed: int) -> float:
            start = time.perf_counter()
            for _ in range(20):
                next(iter(GlobalBatchLoader(dataset, 64, 2, seed=0, consumed_samples=consumed)))
            return (time.perf_counter() - start) / 20

        small_cost, large_cost = resume_cost(1_000 // 64 * 64), resume_cost(10_000_000 // 64 * 64)
        print(f"Resume cost: consumed 1e3 {small_cost * 1e3:.1f} ms, 1e7 {large_cost * 1e3:.1f} ms, "
              f"ratio {large_cost / small_cost:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    main()
