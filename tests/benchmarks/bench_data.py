"""Benchmarks of the data stage, each against a baseline measured side by side in this run.

1. Tokenization throughput (tokens/s) against `datasets`: load_dataset("json") + map(batched=True,
   num_proc=N) with the same tokenizer on the same files, for 1 and 2 workers.
2. Peak memory of tokenization on a corpus and on 4x that corpus (fresh process each, peak RSS).
3. Loader delivery rate per rank (seq 2048, micro-batch 2) against what one H100 consumes training the
   paper's pruned LLaMA-7B shapes: derived, not measured (no GPU here), from PaLM's FLOPs per token
   (training/throughput.py), the H100 SXM's dense bf16 peak and an assumed 45% MFU.
4. Resume cost: building the loader and fetching the first batch at consumed samples 1e3 vs 1e7.
5. Our pipeline (read, parse, tokenize, frame, write) against the bare tokenizer's own batch encoding
   of the same texts, one core each (the physical limit), and the projected time to tokenize
   SlimPajama-627B per node from the measured tokens/s per core.
6. SlimPajama-627B's shape without its tokens: a manifest and sparse shard files for 59,166 input
   files and 627e9 tokens (vocab 32k, uint16), as `prepare` would write them with the default shard
   size. Each simulated rank is a fresh process: loader construction, time to the first batch, peak
   RSS, files and maps it holds (main process and DataLoader workers), for 1 and 64 ranks. The baseline,
   a loader with one shard per input file and every shard mapped, is computed, not run.

Each measured row ends up in a markdown table at the end, in the README's format (`| what | baseline |
ours | ratio |`), ready to paste.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.config import load_config  # noqa: E402
from data.embedded import smollm2_path, text_path  # noqa: E402
from data.loader import GlobalBatchLoader  # noqa: E402
from data.packed import PackedSequences  # noqa: E402
from data.prepare import PrepareConfig, build_manifest, plan_shards, prepare  # noqa: E402
from data.shards import token_dtype  # noqa: E402
from data.text import load_documents  # noqa: E402

ROWS: list[str] = []  # the README table's rows this run measured


def row(what: str, baseline: str, ours: str, ratio: str) -> None:
    ROWS.append(f"| {what} | {baseline} | {ours} | {ratio} |")


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
    """The same work as ours, timed the same way: load the tokenizer, read and parse the files, tokenize, write
    the result to disk (datasets' Arrow cache, ours its shards). The tokens are counted after the clock stops,
    from the Arrow column's list lengths (ours reads the count from its manifest)."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    dataset = datasets.load_dataset("json", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache))
    tokenized = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=workers if workers > 1 else None,
                            remove_columns=["text"])
    seconds = time.perf_counter() - start
    lengths = pc.list_value_length(tokenized.data.column("input_ids"))
    return seconds, int(pc.sum(lengths).as_py())


# A child's own peak: VmHWM (ru_maxrss can carry the parent's peak across fork + exec).
_PEAK_RSS = """
def peak_rss_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
"""

_MEMORY_CHILD = _PEAK_RSS + """
import json, sys
sys.path.insert(0, {root!r})
from data.config import load_config
from data.prepare import PrepareConfig, prepare
config = load_config(PrepareConfig, None, ["inputs=[{inputs}]", "output_dir={out}", "num_workers=1",
                                           "tokenizer={tokenizer}"])
prepare(config)
print(json.dumps(peak_rss_mb()))
"""


def peak_memory(paths: list[Path], out: Path) -> float:
    code = _MEMORY_CHILD.format(root=str(ROOT), inputs=",".join(map(str, paths)), out=out, tokenizer=smollm2_path())
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def bare_tokenizer(backend, path: Path) -> tuple[float, int]:
    """The tokenizer alone on one file's texts, already in memory, in batches as ours (one thread)."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    start, tokens, batch, chars = time.perf_counter(), 0, [], 0

    def flush() -> int:
        count = sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
        batch.clear()
        return count

    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= PrepareConfig.batch_documents or chars >= 1 << 21:
            tokens, chars = tokens + flush(), 0
    tokens += flush()
    return time.perf_counter() - start, tokens


# SlimPajama-627B (cerebras/SlimPajama-627B): 59,166 train files, 627e9 tokens (LLaMA, vocab 32k).
SLIMPAJAMA_FILES, SLIMPAJAMA_TOKENS, SLIMPAJAMA_VOCAB = 59_166, 627_000_000_000, 32_000
VALIDATION_FRACTION, SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 0.0005, 2048, 512, 2


def _sparse_shard(directory: Path, name: str, tokens: int, documents: int, inputs: list[dict]) -> dict:
    """A shard's files with its real sizes but no data: sparse token file, offsets that are zero but
    for the end (a valid, sorted array), and its record with the per-input-file list."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.tokens", "wb") as f:
        f.truncate(tokens * 2)
    offsets = np.lib.format.open_memmap(directory / f"{name}.docs.npy", mode="w+", dtype=np.int64,
                                        shape=(documents + 1,))
    offsets[-1] = tokens
    del offsets
    np.save(directory / f"{name}.sets.npy", np.zeros(0, dtype=np.uint16))
    record = {"name": name, "tokens": tokens, "documents": documents, "sha256": f"{int(name):064x}",
              "sets": ["RedPajamaCommonCrawl"], "set_tokens": {"RedPajamaCommonCrawl": tokens},
              "set_documents": {"RedPajamaCommonCrawl": documents}, "skipped": {}, "filtered_sets": {},
              "input_files": len(inputs)}
    (directory / f"{name}.json").write_text(json.dumps({**record, "inputs": inputs}))
    return record


def write_slimpajama_shape(out: Path) -> dict:
    """The token directory `prepare` would write for SlimPajama-627B, planned by its own shard plan."""
    per_file = SLIMPAJAMA_TOKENS // SLIMPAJAMA_FILES
    inputs = out / "inputs"  # sparse stand-ins of the .jsonl.zst files, sized as the real ones on average
    inputs.mkdir(parents=True)
    files = []
    for k in range(SLIMPAJAMA_FILES):
        path = inputs / f"example_train_{k}.jsonl.zst"
        with open(path, "wb") as f:
            f.truncate(int(per_file / 0.7))
        files.append(path)
    config = PrepareConfig(inputs=[str(inputs)], output_dir=out, validation_fraction=VALIDATION_FRACTION)
    starts = plan_shards(files, config.shard_tokens) + [len(files)]
    shards: dict[str, list[dict]] = {"train": [], "validation": []}
    for g in range(len(starts) - 1):
        count = starts[g + 1] - starts[g]
        held_out = int(count * per_file * VALIDATION_FRACTION)
        inputs_list = [{"name": f"{k:06d}", "source": str(files[k]), "tokens": per_file, "documents": 10_000,
                        "skipped": {}, "filtered_sets": {}} for k in range(starts[g], starts[g + 1])]
        for split, tokens in (("train", count * per_file - held_out), ("validation", held_out)):
            shards[split].append(_sparse_shard(out / split, f"{g:06d}", tokens, tokens // 1000, inputs_list))
    info = {"name": "llama-32k", "fingerprint": "0" * 64, "bos_id": 1, "eos_id": 2, "vocab_size": SLIMPAJAMA_VOCAB}
    manifest = build_manifest(config, info, token_dtype(SLIMPAJAMA_VOCAB), shards, len(files))
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(inputs)
    return manifest


_RANK_CHILD = _PEAK_RSS + """
import json, os, sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
import psutil, torch
from data.loader import GlobalBatchLoader
from data.packed import PackedSequences
imported = time.perf_counter()
directory, world, rank, workers = {directory!r}, {world}, {rank}, {workers}
train = PackedSequences(directory, {seq_len}, "train")
held_out = PackedSequences(directory, {seq_len}, "validation")
loader = GlobalBatchLoader(train, {global_batch}, {micro_batch}, world, rank, seed=0, num_workers=workers)
built = time.perf_counter()
batches = iter(loader)
next(batches)
first = time.perf_counter()
for _ in range(100):
    next(batches)
for i in range(rank, rank + 64):
    held_out[i * 997 % len(held_out)]

def held(pid):
    maps = {{l.split(maxsplit=5)[-1] for l in open(f"/proc/{{pid}}/maps") if len(l.split(maxsplit=5)) == 6}}
    fds = set()
    for fd in os.listdir(f"/proc/{{pid}}/fd"):
        try:
            fds.add(os.readlink(f"/proc/{{pid}}/fd/{{fd}}"))
        except OSError:
            pass
    return len([m for m in maps if m.startswith(directory)]), len([f for f in fds if f.startswith(directory)])

children = [held(c.pid) for c in psutil.Process().children()]
maps, fds = held(os.getpid())
batches.close()  # the loader shuts its workers down now, as a rank does at the end of its loop
print(json.dumps({{"import_s": imported - start, "build_s": built - imported, "first_batch_s": first - imported,
                  "rss_mb": peak_rss_mb(),
                  "maps": maps, "fds": fds, "worker_maps": max([m for m, _ in children], default=0),
                  "worker_fds": max([f for _, f in children], default=0),
                  "fd_total": len(os.listdir("/proc/self/fd")), "shards": len(train.manifest.shards("train"))}}))
"""


def simulate_rank(directory: Path, world: int, rank: int, workers: int) -> subprocess.Popen:
    code = _RANK_CHILD.format(root=str(ROOT), directory=str(directory), world=world, rank=rank, workers=workers,
                              seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def simulate_ranks(directory: Path, world: int, workers: int, concurrent: int = 2) -> list[dict]:
    """Every rank of a `world`-rank job as its own process, `concurrent` at a time (this machine's size)."""
    results, running = [], []
    for rank in range(world):
        running.append(simulate_rank(directory, world, rank, workers))
        if len(running) == concurrent or rank == world - 1:
            for process in running:
                out, _ = process.communicate()
                if process.returncode:
                    raise RuntimeError(f"simulated rank failed with exit code {process.returncode}")
                results.append(json.loads(out.strip().splitlines()[-1]))
            running = []
    return results


def scale_report(work: Path) -> None:
    start = time.perf_counter()
    manifest = write_slimpajama_shape(work / "slimpajama-shape")
    shards = manifest["splits"]["train"]["shards"]
    size = (work / "slimpajama-shape" / "manifest.json").stat().st_size
    print(f"SlimPajama-627B shape: {SLIMPAJAMA_FILES:,} input files, {manifest['splits']['train']['tokens']:,} "
          f"train tokens in {len(shards)} shards of ~{shards[0]['tokens'] / 1e9:.2f}B tokens "
          f"({shards[0]['tokens'] * 2 / 2**30:.1f} GiB); manifest {size / 1e6:.2f} MB; written in "
          f"{time.perf_counter() - start:.0f} s (sparse files)")
    print(f"  per rank: seq {SEQ_LEN}, global batch {GLOBAL_BATCH}, micro {MICRO_BATCH}, 100 micro-batches + "
          f"64 validation sequences read; files/maps counted under the token directory")
    print(f"  {'ranks':>5} {'workers':>7} {'import s':>9} {'build s':>8} {'1st batch s (med/max)':>22} "
          f"{'peak RSS MB (max)':>18} {'maps':>5} {'fds':>4} {'worker maps/fds':>16} {'all fds':>8}")
    measured = {}
    for world, workers in ((1, 0), (1, 2), (64, 0)):
        rows = simulate_ranks(work / "slimpajama-shape", world, workers)
        measured[world, workers] = rows
        first = sorted(r["first_batch_s"] for r in rows)
        print(f"  {world:>5} {workers:>7} {max(r['import_s'] for r in rows):>9.2f} "
              f"{max(r['build_s'] for r in rows):>8.3f} {first[len(first) // 2]:>10.3f} / {first[-1]:<9.3f} "
              f"{max(r['rss_mb'] for r in rows):>18.0f} {max(r['maps'] for r in rows):>5} "
              f"{max(r['fds'] for r in rows):>4} {max(r['worker_maps'] for r in rows):>8}/"
              f"{max(r['worker_fds'] for r in rows):<7} {max(r['fd_total'] for r in rows):>8}")
    print("  (build = manifest parse + both splits + loader; 1st batch counts from after the imports; a DataLoader"
          " worker holds at most as many maps as the main process: max_open_shards=8 x 2 files)")
    # The baseline is arithmetic, not a run: a loader that kept one shard per input file, every shard mapped.
    per_file = SLIMPAJAMA_FILES * 2 * 2  # files x splits (train, validation) x (tokens, document offsets)
    limit = Path("/proc/sys/vm/max_map_count").read_text().strip()
    print(f"  baseline (computed, not run): one shard per input file, all mapped: {SLIMPAJAMA_FILES:,} files x 2 "
          f"splits x 2 files = {per_file:,} open files and maps per rank (vm.max_map_count here: {limit})")
    ranks, one = measured[64, 0], measured[1, 0][0]
    first = sorted(r["first_batch_s"] for r in ranks)
    row(f"loader at SlimPajama-627B's shape ({SLIMPAJAMA_FILES:,} inputs, {SLIMPAJAMA_TOKENS:.3g} tokens, sparse "
        f"files; seq {SEQ_LEN}, global batch {GLOBAL_BATCH})",
        f"one shard per input file, all mapped: {per_file:,} files and maps per rank (computed, not run; "
        f"vm.max_map_count {limit})",
        f"{len(shards)} shards; 64 ranks: first batch {first[len(first) // 2]:.2f} s median, {first[-1]:.2f} s max; "
        f"peak RSS {max(r['rss_mb'] for r in ranks):.0f} MB; {one['fds']} files + {one['maps']} maps "
        "(train + validation)", "O(1) in corpus size")


H100_TFLOPS, ASSUMED_MFU = 989.4, 0.45  # H100 SXM dense bf16 (training/throughput.py); the README's MFU target
LLAMA_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)


def h100_appetite() -> dict[str, float]:
    """Tokens/s one H100 consumes training the paper's pruned LLaMA-7B, 20% (26 blocks) and 80% (6 blocks,
    the smallest recipe and so the hungriest): peak x MFU / (6 N + 12 L d s). Derived, never measured here."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training.throughput import device_peak_tflops, flops_per_token

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == H100_TFLOPS
    appetite = {}
    for pruned, blocks in (("20%", 26), ("80%", 6)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B_SHAPE, num_hidden_layers=blocks))
        appetite[f"LLaMA-7B pruned {pruned} ({blocks} blocks)"] = (H100_TFLOPS * 1e12 * ASSUMED_MFU /
                                                                    flops_per_token(model, SEQ_LEN))
    return appetite


def pipeline_against_bare(paths: list[Path], out: Path, rounds: int = 2) -> tuple[float, int, float, int]:
    """Our worker's steady state (read, parse, tokenize, frame and write a file, tokenizer loaded) and the
    bare tokenizer, interleaved file by file so that the load of this shared machine hits both alike."""
    from data import prepare as stage

    settings = {"output_dir": str(out), "dtype": "<u2", "splits": ["train"], "add_bos": True, "add_eos": True,
                "include_sets": [], "exclude_sets": [], "validation_fraction": 0.0, "text_field": "text",
                "set_field": "meta.redpajama_set_name", "batch_documents": PrepareConfig.batch_documents}
    stage._init_worker(smollm2_path(), settings)
    backend = stage._WORKER["tokenizer"]._tokenizer
    ours_s = ours_tokens = bare_s = bare_tokens = 0
    for _ in range(rounds):
        for k, path in enumerate(paths):
            seconds, tokens = bare_tokenizer(backend, path)
            bare_s, bare_tokens = bare_s + seconds, bare_tokens + tokens
            start = time.perf_counter()
            ours_tokens += stage._tokenize_file((k, str(path)))["records"]["train"]["tokens"]
            ours_s += time.perf_counter() - start
    return ours_s, ours_tokens, bare_s, bare_tokens


def tokenizer_report(work: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each, as in a worker
    paths = write_corpus(work / "corpus-16", copies=1, files=16)
    ours_s, ours_tokens, bare_s, bare_tokens = pipeline_against_bare(paths, work / "pipeline")
    per_core = ours_tokens / ours_s
    print(f"Tokenization, one core, {ours_tokens / 2e6:.1f}M tokens x 2: our pipeline (read + parse + tokenize + "
          f"frame + write) {per_core:,.0f} tokens/s; the bare tokenizer's batch encode of the same texts in memory "
          f"{bare_tokens / bare_s:,.0f} tokens/s; ratio {ours_s / bare_s * bare_tokens / ours_tokens:.2f}x")
    for cores in (32, 64, 128):
        hours = SLIMPAJAMA_TOKENS / (per_core * cores) / 3600
        print(f"  SlimPajama-627B projected on one {cores}-core node: {hours:,.0f} h; on 16 such nodes: "
              f"{hours / 16:,.1f} h (linear in cores, this tokenizer, this machine's per-core speed)")
    row("tokenization pipeline, one core (read + parse + tokenize + frame + write)",
        f"the bare tokenizer's batch encode of the same texts in memory: {bare_tokens / bare_s:,.0f} tokens/s",
        f"{per_core:,.0f} tokens/s", f"{ours_s / bare_s * bare_tokens / ours_tokens:.2f}x")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="shorten-bench-data-"))
    try:
        paths = write_corpus(work / "corpus", copies=2)
        scale_report(work)
        tokenizer_report(work)
        print("Tokenization, SmolLM2 tokenizer, real text (books, C4, Wikipedia); the same work on both sides: "
              "tokenizer load, read, parse, tokenize, write to disk")
        rates = {}
        for workers in (1, 2):
            ours_s, ours_tokens = ours(paths, work / f"ours-{workers}", workers)
            base_s, base_tokens = baseline(paths, workers, work / f"hf-cache-{workers}")
            rates[workers] = ours_tokens / ours_s, base_tokens / base_s
            print(f"  {workers} worker(s): ours {rates[workers][0]:>10,.0f} tokens/s   datasets.map "
                  f"{rates[workers][1]:>10,.0f} tokens/s   ratio {rates[workers][0] / rates[workers][1]:.2f}x")
        scaling = rates[2][0] / rates[1][0]
        print(f"  scaling 1 -> 2 workers (ours): {scaling:.2f}x")
        row("tokenization, 1 worker", f'`datasets` load_dataset("json") + map(batched): {rates[1][1]:,.0f} tokens/s',
            f"{rates[1][0]:,.0f} tokens/s", f"{rates[1][0] / rates[1][1]:.2f}x")
        row("tokenization, 2 workers", f"`datasets` map(num_proc=2): {rates[2][1]:,.0f} tokens/s",
            f"{rates[2][0]:,.0f} tokens/s", f"{rates[2][0] / rates[2][1]:.2f}x (ours scales {scaling:.2f}x from 1 to 2 "
            "workers)")

        small = write_corpus(work / "mem-1x", copies=1, files=1)
        large = write_corpus(work / "mem-4x", copies=4, files=1)
        one, four = peak_memory(small, work / "mem-out-1"), peak_memory(large, work / "mem-out-4")
        print(f"Tokenization peak RSS: corpus {one:.0f} MB, 4x corpus {four:.0f} MB, ratio {four / one:.3f}")
        row("tokenization peak RSS", f"corpus: {one:.0f} MB", f"4x corpus: {four:.0f} MB", f"{four / one:.2f}")

        dataset = PackedSequences(work / "ours-1", 2048)
        loader = iter(GlobalBatchLoader(dataset, global_batch=64, micro_batch=2, seed=0))
        next(loader)
        start = time.perf_counter()
        batches = 200
        for _ in range(batches):
            next(loader)
        rate = batches * 2 * 2048 / (time.perf_counter() - start)
        appetite = h100_appetite()
        hungriest = max(appetite.values())
        print(f"Loader delivery per rank (seq 2048, micro 2, 0 workers): {rate:,.0f} tokens/s")
        for name, tokens_per_s in appetite.items():
            print(f"  {rate / tokens_per_s:,.0f}x what one H100 consumes training {name}: ~{tokens_per_s:,.0f} tokens/s "
                  f"(derived, not measured: {H100_TFLOPS} TFLOP/s x {ASSUMED_MFU:.0%} MFU (assumed) / PaLM FLOPs per "
                  "token at seq 2048)")
        row("loader delivery per rank (seq 2048, micro 2)",
            f"one H100 training the 80%-pruned LLaMA-7B (6 blocks), the hungriest recipe: ~{hungriest:,.0f} tokens/s "
            f"(derived: bf16 peak x {ASSUMED_MFU:.0%} MFU, assumed)", f"{rate:,.0f} tokens/s",
            f"{rate / hungriest:,.0f}x headroom")

        def resume_cost(consumed: int) -> float:
            start = time.perf_counter()
            for _ in range(20):
                next(iter(GlobalBatchLoader(dataset, 64, 2, seed=0, consumed_samples=consumed)))
            return (time.perf_counter() - start) / 20

        small_cost, large_cost = resume_cost(1_000 // 64 * 64), resume_cost(10_000_000 // 64 * 64)
        print(f"Resume cost: consumed 1e3 {small_cost * 1e3:.1f} ms, 1e7 {large_cost * 1e3:.1f} ms, "
              f"ratio {large_cost / small_cost:.2f}")
        row("loader resume", f"consumed 1e3: {small_cost * 1e3:.1f} ms", f"consumed 1e7: {large_cost * 1e3:.1f} ms",
            f"{large_cost / small_cost:.2f} (O(1))")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nREADME rows (Benchmarks table):\n| what | baseline | ours | ratio |\n| --- | --- | --- | --- |")
    print("\n".join(ROWS))


if __name__ == "__main__":
    print(f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    main()
