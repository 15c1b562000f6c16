"""SlimPajama's shape at small size: thousands of input files in its layout, tokenized by a pool and by
a 2-part array, then real 2-rank DeepSpeed training with validation under a 256 open-file limit. The
shards are small on purpose: more than the limit's worth of files if a rank opened them all (as the
one-shard-per-input-file loader did, two files per shard and split), so only a bounded loader passes."""

import json
import subprocess
import textwrap
from pathlib import Path

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
