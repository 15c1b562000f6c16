"""SlimPajama's shape at small size: thousands of input files in its layout, tokenized by a pool and by
a 2-part array, then real 2-rank DeepSpeed training with validation under a 256 open-file limit. The
shards are small on purpose: more than the limit's worth of files if a rank opened them all (as the
one-shard-per-input-file loader did, two files per shard and split), so only a bounded loader passes."""

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data.config import load_config
from data.prepare import PrepareConfig, prepare
from data.text import load_documents
from tests.test_cpt import ROOT, cpt_command, environment

FILES = 2000  # 10 chunks x 200 files
FILE_LIMIT = 256


@pytest.fixture(scope="module")
def many_files(tmp_path_factory, wiki_path) -> Path:
    """train/chunk1..10/example_train_K.jsonl.zst, 3 real documents (C4, Wikipedia paragraphs) each."""
    root = tmp_path_factory.mktemp("SlimPajama-627B")
    c4 = [(t[:600], "RedPajamaC4") for t in load_documents("embedded:c4_demo.jsonl")]
    wiki = [(p, "RedPajamaWikipedia") for t in load_documents(str(wiki_path)) for p in textwrap.wrap(t, 600)]
    docs = c4 + wiki
    compressor = zstandard.ZstdCompressor()
    for k in range(FILES):
        chunk = root / "train" / f"chunk{k % 10 + 1}"
        chunk.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) for t, s in
                 (docs[(3 * k + j) % len(docs)] for j in range(3))]
        (chunk / f"example_train_{k // 10}.jsonl.zst").write_bytes(compressor.compress(("\n".join(lines) + "\n").encode()))
    return root


def _prepare(root: Path, out: Path, model: Path, *overrides: str) -> dict:
    config = load_config(PrepareConfig, None, [f"inputs=[{root}]", f"output_dir={out}", f"tokenizer={model}",
                                               "validation_fraction=0.05", "shard_tokens=8000", *overrides])
    return json.loads(prepare(config).read_text())


@pytest.mark.slow
def test_thousands_of_files_tokenize_merge_and_train_under_a_file_limit(many_files, cpt_inputs, tmp_path):
    pooled = _prepare(many_files, tmp_path / "pooled", cpt_inputs["model"], "num_workers=2")
    for index in range(2):
        _prepare(many_files, tmp_path / "array", cpt_inputs["model"], "num_workers=1", f"shard_index={index}",
                 "num_shards=2")
    merged = _prepare(many_files, tmp_path / "array", cpt_inputs["model"], "num_shards=2", "merge=true")
    assert pooled["num_input_files"] == FILES and merged["fingerprint"] == pooled["fingerprint"]
    for key in ("splits", "sets", "skipped", "filtered_sets"):
        assert merged[key] == pooled[key], key
    shards = pooled["splits"]["train"]["shards"]
    assert FILE_LIMIT < 2 * len(shards) < FILES and sum(s["input_files"] for s in shards) == FILES

    run_dir = tmp_path / "run"
    command = cpt_command({**cpt_inputs, "tokens": tmp_path / "array"}, run_dir, "zero_stage=2", "train_steps=2",
                          "global_batch=256", "micro_batch=8", "data.num_workers=0",  # each rank reads ~130 shards
                          "validation.every_steps=1", "validation.sequences=64", "checkpoint.every_steps=0")
    result = subprocess.run(["bash", "-c", f'ulimit -n {FILE_LIMIT} && exec "$@"', "bash", *command],
                            capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "train.loss" in r) == [1, 2]
    assert sorted(r["step"] for r in records if "val.loss" in r)[-2:] == [1, 2]


# SlimPajama-627B's source sets and their shares of its tokens (its dataset card)
SLIMPAJAMA_SETS = {"RedPajamaCommonCrawl": 0.522, "RedPajamaC4": 0.267, "RedPajamaGithub": 0.052,
                   "RedPajamaBook": 0.042, "RedPajamaArXiv": 0.046, "RedPajamaWikipedia": 0.038,
                   "RedPajamaStackExchange": 0.033}


def _sparse_slimpajama(out: Path, shards: int = 620, tokens: int = 1_000_000_000) -> None:
    """Token shards at SlimPajama-627B's shape without its tokens: sparse files, every shard holding all seven
    sets in their shares (documents grouped by set, as prepare writes them), and the manifest."""
    from data.prepare import build_manifest
    from data.shards import token_dtype

    records = []
    (out / "train").mkdir(parents=True)
    for k in range(shards):
        name = f"{k:06d}"
        counts = {s: int(tokens * share) for s, share in SLIMPAJAMA_SETS.items()}
        total = sum(counts.values())
        with open(out / "train" / f"{name}.tokens", "wb") as f:
            f.truncate(total * 2)
        np.save(out / "train" / f"{name}.docs.npy", np.cumsum([0, *counts.values()], dtype=np.int64))  # a document a set
        records.append({"name": name, "tokens": total, "documents": len(counts), "sha256": f"{k:064x}",
                        "sets": list(counts), "set_tokens": counts, "set_documents": dict.fromkeys(counts, 1),
                        "skipped": {}, "filtered_sets": {}, "input_files": 95})
    info = {"name": "llama-32k", "fingerprint": "0" * 64, "bos_id": 1, "eos_id": 2, "vocab_size": 32_000}
    manifest = build_manifest(PrepareConfig(), info, token_dtype(32_000), {"train": records}, 59_166)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_a_mixture_at_slimpajamas_shape_keeps_each_rank_small_and_the_order_world_size_free(tmp_path):
    """620 shards of 1e9 tokens, 7 sets, seq 2048, global batch 512: each of 64 simulated ranks builds its
    by-set sequences and loader from the manifest alone, holds at most 16 mapped or open shard files, and
    the first global batches, gathered over the 64 ranks, equal those of one rank."""
    from data.loader import GlobalBatchLoader
    from data.packed import PackedSequences
    from tests.test_data import _mapped_files
    from tests.test_mixture import Tagged

    _sparse_slimpajama(tmp_path)
    weights = {"RedPajamaCommonCrawl": 0.3, "RedPajamaC4": 0.4, "RedPajamaBook": 0.1, "RedPajamaWikipedia": 0.1,
               "RedPajamaArXiv": 0.05, "RedPajamaStackExchange": 0.05}  # RedPajamaGithub left out

    def first_steps(world: int, rank: int) -> list[list[int]]:
        dataset = Tagged(PackedSequences(tmp_path, 2048, by_set=True))  # each sample with its index
        assert len(dataset) > 300_000_000 and not _mapped_files(tmp_path)
        loader = GlobalBatchLoader(dataset, 512, 2, world, rank, seed=3, mixture=weights,
                                   consumed_samples=512 * 10**5)  # resumed deep into the run: no replay
        batches, steps = iter(loader), []
        for _ in range(2):
            steps.append([i for _ in range(loader.accumulation) for i in next(batches)["index"].tolist()])
            assert len(_mapped_files(tmp_path)) <= 16
        return steps

    one = first_steps(1, 0)
    gathered = [[], []]
    for rank in range(64):
        for step, ids in enumerate(first_steps(64, rank)):
            gathered[step] += ids
    assert gathered == one
    ranges = PackedSequences(tmp_path, 2048, by_set=True).set_ranges
    for name, items in ranges.items():  # each set's share of each global batch, within 2 sequences
        assert all(abs(sum(i in items for i in step) - 512 * weights.get(name, 0)) < 2 for step in one), name
