"""The data stage: SlimPajama-layout corpora to token shards, and the packed resumable loader."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from data.config import load_config
from data.corpus import CorpusError
from data.loader import GlobalBatchLoader
from data.packed import IGNORE_INDEX, PackedSequences
from data.prepare import PrepareConfig, prepare
from data.shards import DataMismatchError
from data.text import load_documents

SETS = ("RedPajamaC4", "RedPajamaWikipedia", "RedPajamaGithub")


def _write_zst(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory, wiki_path):
    """SlimPajama's exact layout, built from real text (C4 and Wikipedia samples)."""
    root = tmp_path_factory.mktemp("SlimPajama-627B")
    c4 = load_documents("embedded:c4_demo.jsonl")
    wiki = load_documents(str(wiki_path))
    docs = [(t, "RedPajamaC4") for t in c4] + [(t, "RedPajamaWikipedia") for t in wiki]
    docs += [(f"def f{i}(x):\n    return x * {i}\n", "RedPajamaGithub") for i in range(20)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(docs))
    for chunk, files in ((1, 3), (2, 2)):
        for f in range(files):
            part = [docs[i] for i in order[(chunk * 10 + f) % 7::7][:60]]
            lines = [json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) for t, s in part]
            _write_zst(root / "train" / f"chunk{chunk}" / f"example_train_{f}.jsonl.zst", lines)
    _write_zst(root / "validation" / "chunk1" / "example_holdout_0.jsonl.zst",
               [json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) for t, s in docs[:5]])
    return root


def _config(root, out, tokenizer_dir, *overrides):
    return load_config(PrepareConfig, None, [f"inputs=[{root}]", f"output_dir={out}",
                                             f"tokenizer={tokenizer_dir}", "num_workers=1", *overrides])


def test_tokenized_shards_hold_exactly_the_documents(slimpajama, smollm2_dir, tokenizer, tmp_path):
    """Small shards: each holds several whole input files and nothing else, grouped by source set (in the
    order of its `sets`), in sorted file order within a set."""
    manifest_path = prepare(_config(slimpajama, tmp_path / "tok", smollm2_dir, "num_workers=2", "shard_tokens=80000"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["dtype"] == "uint16" and manifest["num_input_files"] == 5
    assert set(manifest["sets"]) == set(SETS)
    shards = manifest["splits"]["train"]["shards"]
    assert 1 < len(shards) < 5 and all("inputs" not in s for s in shards)
    assert not (tmp_path / "tok" / "pieces").exists()
    sources = []
    for shard in shards:
        tokens = np.fromfile(tmp_path / "tok" / "train" / f"{shard['name']}.tokens", dtype=np.uint16)
        offsets = np.load(tmp_path / "tok" / "train" / f"{shard['name']}.docs.npy")
        assert len(tokens) == shard["tokens"] == offsets[-1]
        inputs = json.loads((tmp_path / "tok" / "train" / f"{shard['name']}.json").read_text())["inputs"]
        assert shard["input_files"] == len(inputs) and shard["documents"] == len(offsets) - 1
        files = [[json.loads(line) for line in zstandard.ZstdDecompressor().stream_reader(
            open(record["source"], "rb")).read().decode().splitlines()] for record in inputs]
        records = [r for name in shard["sets"] for file in files for r in file
                   if r["meta"]["redpajama_set_name"] == name]
        set_ids = np.load(tmp_path / "tok" / "train" / f"{shard['name']}.sets.npy")
        assert [shard["sets"][i] for i in set_ids] == [r["meta"]["redpajama_set_name"] for r in records]
        sources += [record["source"] for record in inputs]
        for k, record in enumerate(records):
            ids = tokens[offsets[k]:offsets[k + 1]].tolist()
            assert ids == [tokenizer.bos_token_id] + tokenizer(record["text"], add_special_tokens=False).input_ids + [
                tokenizer.eos_token_id]
        assert shard["set_documents"] == dict(Counter(r["meta"]["redpajama_set_name"] for r in records))
    assert sources == sorted(sources) and len(sources) == 5
    total = sum(s["tokens"] for s in shards)
    assert total == manifest["splits"]["train"]["tokens"] == sum(s["tokens"] for s in manifest["sets"].values())


def test_filters_validation_split_and_existing_output(slimpajama, smollm2_dir, tmp_path):
    out = tmp_path / "tok"
    config = _config(slimpajama, out, smollm2_dir, "exclude_sets=[RedPajamaGithub]", "validation_fraction=0.1")
    manifest = json.loads(prepare(config).read_text())
    assert "RedPajamaGithub" not in manifest["sets"] and manifest["filtered_sets"]["RedPajamaGithub"] > 0
    assert 0 < manifest["splits"]["validation"]["documents"] < manifest["splits"]["train"]["documents"]
    with pytest.raises(FileExistsError, match="overwrite=true"):
        prepare(config)


def test_scale_out_parts_merge_to_the_single_run(slimpajama, smollm2_dir, tmp_path):
    single = json.loads(prepare(_config(slimpajama, tmp_path / "one", smollm2_dir, "shard_tokens=80000")).read_text())
    for index in range(2):
        prepare(_config(slimpajama, tmp_path / "two", smollm2_dir, f"shard_index={index}", "num_shards=2",
                        "shard_tokens=80000"))
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "two").glob("manifest.part-*.json"))]
    assert [[s["name"] for s in p["splits"]["train"]["shards"]] for p in parts] == [["000000", "000002"], ["000001"]]
    with pytest.raises(FileExistsError):
        prepare(_config(slimpajama, tmp_path / "two", smollm2_dir, "shard_index=0", "num_shards=2",
                        "shard_tokens=80000"))
    merged = json.loads(prepare(_config(slimpajama, tmp_path / "two", smollm2_dir, "num_shards=2",
                                        "shard_tokens=80000", "merge=true")).read_text())
    assert merged["fingerprint"] == single["fingerprint"]
    for key in ("splits", "sets", "skipped", "filtered_sets", "num_input_files", "tokenizer", "dtype"):
        assert merged[key] == single[key], key
    assert not (tmp_path / "two" / "pieces").exists()


def test_bad_records_are_skipped_and_counted(smollm2_dir, tmp_path, caplog):
    good = json.dumps({"text": "A good document.", "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()
    lines = [good, b"{not json", json.dumps({"meta": {}}).encode(), b'{"text": "bad \xff\xfe utf8"}',
             json.dumps({"text": "   "}).encode(), good]
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines) + b"\n")
    manifest = json.loads(prepare(_config(path, tmp_path / "tok", smollm2_dir)).read_text())
    assert manifest["skipped"] == {"empty": 1, "invalid_utf8": 1, "malformed_json": 1, "missing_text": 1}
    assert manifest["splits"]["train"]["documents"] == 2
    assert "bad.jsonl:2: skipped record (malformed_json)" in caplog.text


def test_nothing_matched_is_an_error(smollm2_dir, tmp_path):
    with pytest.raises(CorpusError, match="matches no"):
        prepare(_config(str(tmp_path / "*.jsonl.zst"), tmp_path / "tok", smollm2_dir))
    with pytest.raises(CorpusError, match="does not exist"):
        prepare(_config(tmp_path / "missing.jsonl", tmp_path / "tok", smollm2_dir))


def test_corrupt_stream_fails_its_file_and_a_rerun_redoes_only_it(slimpajama, smollm2_dir, tmp_path, caplog):
    """Shards of 2, 2 and 1 files; the second file is damaged: the other shards finish, the first file's
    piece is kept, and the re-run tokenizes only the repaired file into output equal to an uninterrupted run."""
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(slimpajama, root)
    victim = root / "train" / "chunk1" / "example_train_1.jsonl.zst"
    intact = victim.read_bytes()
    victim.write_bytes(intact[: len(intact) // 2])  # truncated download
    out = tmp_path / "tok"
    with pytest.raises(CorpusError, match="example_train_1.jsonl.zst: corrupt or truncated zstd"):
        prepare(_config(root, out, smollm2_dir, "shard_tokens=80000"))
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "train").glob("*.json")) == ["000001.json", "000002.json"]
    assert sorted(p.name for p in (out / "pieces" / "train").glob("*.json")) == ["000000.json"]
    assert not list((out / "train").glob(".*")) and not list((out / "pieces" / "train").glob(".*"))
    finished = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.json")}
    victim.write_bytes(intact)
    caplog.clear()
    manifest = json.loads(prepare(_config(root, out, smollm2_dir, "shard_tokens=80000")).read_text())
    assert "4 of 5 files already tokenized" in caplog.text
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # not redone
    assert [s["input_files"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 1]
    uninterrupted = json.loads(prepare(_config(slimpajama, tmp_path / "one", smollm2_dir,
                                               "shard_tokens=80000")).read_text())
    assert manifest["fingerprint"] == uninterrupted["fingerprint"]
    with pytest.raises(DataMismatchError, match="different settings"):
        os.remove(out / "manifest.json")
        prepare(_config(root, out, smollm2_dir, "shard_tokens=80000", "add_eos=false"))


# --- the packed loader ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens_dir(slimpajama, smollm2_dir, tmp_path_factory):
    """Three shards: sequences cross shard boundaries."""
    out = tmp_path_factory.mktemp("tokens") / "tok"
    prepare(_config(slimpajama, out, smollm2_dir, "shard_tokens=80000"))
    return out


def _order(tokens_dir, world_size, workers, steps=3, global_batch=16, consumed=0):
    """Sequence ids of `steps` global batches, gathered from every rank in rank order."""
    dataset = PackedSequences(tokens_dir, 64)
    per_step = []
    for rank in range(world_size):
        loader = GlobalBatchLoader(dataset, global_batch, 2, world_size, rank, seed=5, num_workers=workers,
                              consumed_samples=consumed)
        batches = iter(loader)
        for step in range(steps):
            rows = [next(batches)["input_ids"] for _ in range(loader.accumulation)]
            if rank == 0:
                per_step.append([])
            per_step[step].extend(torch.cat(rows).tolist())
    return per_step


def test_order_is_independent_of_world_size_and_workers(tokens_dir):
    reference = _order(tokens_dir, 1, 0)
    for world_size, workers in ((2, 0), (4, 0), (8, 0), (2, 2)):
        assert _order(tokens_dir, world_size, workers) == reference, (world_size, workers)


def test_resume_continues_exactly_even_on_another_world_size(tokens_dir):
    dataset = PackedSequences(tokens_dir, 64)
    loader = GlobalBatchLoader(dataset, 16, 2, world_size=1, rank=0, seed=5)
    batches = iter(loader)
    for _ in range(2 * loader.accumulation):
        next(batches)
    state = loader.state_dict()
    assert state["consumed_samples"] == 32 and state["fingerprint"] == dataset.manifest.fingerprint
    uninterrupted = _order(tokens_dir, 1, 0, steps=3)
    resumed = _order(tokens_dir, 2, 0, steps=1, consumed=state["consumed_samples"])
    assert resumed[0] == uninterrupted[2]
    restored = GlobalBatchLoader(dataset, 16, 2, world_size=4, rank=0, seed=0)
    restored.load_state_dict(state)
    assert restored.consumed_samples == 32 and restored.seed == 5
    with pytest.raises(DataMismatchError, match="global batch"):
        GlobalBatchLoader(dataset, 32, 2).load_state_dict(state)


def test_epochs_wrap_with_a_new_order(tokens_dir):
    from data.loader import GlobalBatchSampler

    dataset = PackedSequences(tokens_dir, 512)
    n = len(dataset)
    ids = GlobalBatchSampler(n, 1, 1, 1, 0, seed=1).item_ids(np.arange(2 * n))
    assert sorted(ids[:n]) == list(range(n)) == sorted(ids[n:]) and list(ids[:n]) != list(ids[n:])
    loader = GlobalBatchLoader(dataset, 2, 1, seed=1, consumed_samples=2 * n)
    first = next(iter(loader))["input_ids"][0]
    third_epoch = GlobalBatchSampler(n, 1, 1, 1, 0, seed=1).item_ids(np.array([2 * n]))[0]
    assert torch.equal(first, dataset[int(third_epoch)]["input_ids"])
    assert loader.state_dict()["epoch"] == 2


def test_tokenizer_mismatch_is_refused(tokens_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(DataMismatchError, match="tokenized with another tokenizer"):
        PackedSequences(tokens_dir, 64, tokenizer=PreTrainedTokenizerFast(tokenizer_object=other))


def test_document_masking_equals_separate_documents(tokens_dir, tokenizer):
    from tests.tiny_models import make_tiny_model

    dataset = PackedSequences(tokens_dir, 256, tokenizer=tokenizer)
    index = next(i for i in range(len(dataset)) if (dataset[i]["labels"] == IGNORE_INDEX).sum() >= 2)
    sample = dataset[index]
    starts = [0] + torch.nonzero(sample["labels"] == IGNORE_INDEX).flatten().tolist() + [256]
    assert all(sample["position_ids"][s] == 0 for s in starts[:-1])
    model = make_tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None], position_ids=sample["position_ids"][None],
                       use_cache=False).logits[0]
        packed = torch.nn.functional.cross_entropy(logits[:-1], sample["labels"][1:], reduction="sum",
                                                   ignore_index=IGNORE_INDEX)
        separate = 0.0
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            doc = sample["input_ids"][a:b][None]
            separate += model(input_ids=doc, labels=doc).loss * (b - a - 1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    unmasked = PackedSequences(tokens_dir, 256, document_masking=False)[index]
    assert torch.equal(unmasked["position_ids"], torch.arange(256)) and (unmasked["labels"] >= 0).all()


def test_a_file_that_is_not_zstd_fails_with_its_name(smollm2_dir, tmp_path):
    garbage = tmp_path / "in" / "example_train_0.jsonl.zst"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a zstd stream at all\n" * 10)
    with pytest.raises(CorpusError, match="example_train_0.jsonl.zst: corrupt or truncated zstd"):
        prepare(_config(garbage, tmp_path / "tok", smollm2_dir))
    assert not (tmp_path / "tok" / "manifest.json").exists()


def _mapped_files(under: Path) -> set[str]:
    """Files under `under` that this process has memory-mapped or open."""
    maps = {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}
    fds = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")}
    return {path for path in maps | fds if path.startswith(str(under))}


def test_a_reader_keeps_at_most_max_open_shards_mapped(tokens_dir):
    """Random reads over 3 shards with one shard open at a time: the same sequences as with all open,
    and never more than that shard's token and offset files mapped."""
    from data.shards import Manifest

    assert Manifest.load(tokens_dir).data is Manifest.load(tokens_dir).data  # parsed once per process
    narrow = PackedSequences(tokens_dir, 64, max_open_shards=1)
    assert len(narrow.manifest.shards("train")) == 3 and not _mapped_files(tokens_dir)
    order = np.random.default_rng(0).permutation(len(narrow))[:200]
    seen, most = [], 0
    for index in order:
        seen.append(narrow[int(index)])
        most = max(most, len(_mapped_files(tokens_dir)))
    assert most == 2
    wide = PackedSequences(tokens_dir, 64)
    for index, sample in zip(order, seen, strict=True):
        assert all(torch.equal(sample[k], wide[int(index)][k]) for k in sample)
    assert len(_mapped_files(tokens_dir)) == 6
