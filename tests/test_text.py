import json
import random

import pytest
import torch
import zstandard
from transformers import AutoTokenizer

from data.text import TextSourceError, load_documents
from pruning.calibration import CalibrationError, sample_calibration, sample_concatenated


@pytest.fixture
def sources(tmp_path):
    docs = ["first document here", "", "second one", "third"]
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(docs))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "meta": {}}) for d in docs) + "\n")
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"output": d} for d in docs]))
    json_lines = tmp_path / "lines.json"  # JSON lines under a .json name, as `datasets` writes them
    json_lines.write_text(jsonl.read_text())
    return {"txt": txt, "jsonl": jsonl, "zst": zst, "json": js, "json_lines": json_lines}


def test_local_formats_give_the_same_documents(sources):
    expected = ["first document here", "second one", "third"]
    assert load_documents(str(sources["txt"])) == expected
    assert load_documents(str(sources["jsonl"])) == expected
    assert load_documents(str(sources["zst"])) == expected
    assert load_documents(str(sources["json"]), text_field="output") == expected
    assert load_documents(str(sources["json_lines"])) == expected


def test_missing_field_and_file(sources, tmp_path):
    with pytest.raises(TextSourceError, match="no 'text' field"):
        load_documents(str(sources["json"]))
    with pytest.raises(TextSourceError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TextSourceError, match="no non-empty documents"):
        load_documents(str(empty))


def test_embedded_texts_are_real(wiki_path, books_path):
    wiki = load_documents(str(wiki_path))
    assert len(wiki) >= 30 and "Anarchism" in wiki[0]
    books = load_documents(str(books_path))
    assert len(books) > 70 and sum(len(b) > 50_000 for b in books) > 70  # whole books
    assert len(load_documents("embedded:c4_demo.jsonl")) == 300
    assert len(load_documents("embedded:alpaca_en_demo.json", text_field="instruction")) > 900


def test_calibration_is_seeded_and_windowed(tokenizer, books_path):
    docs = load_documents(str(books_path))
    a = sample_calibration(docs, tokenizer, 10, 128, seed=1234)
    b = sample_calibration(docs, tokenizer, 10, 128, seed=1234)
    c = sample_calibration(docs, tokenizer, 10, 128, seed=7)
    assert a.shape == (10, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 10
    with pytest.raises(CalibrationError, match="lower calibration.num_samples or calibration.seq_len"):
        sample_calibration(["short text", "also short"], tokenizer, 2, 128, seed=0)


def _official_get_examples(rows, tokenizer, n_samples, seq_len=128, add_bos_to_every=False):
    """shortened-llm src/dataset.py get_examples, transcribed line by line (after set_seed(1234))."""
    random.seed(1234)
    tokenized_samples, history = [], []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(rows) - 1)
            tokenized_sample = tokenizer(rows[i], return_tensors="pt", add_special_tokens=not add_bos_to_every)
            if tokenized_sample.input_ids.shape[1] >= seq_len and i not in history:
                history.append(i)
                break
        j = random.randint(0, tokenized_sample.input_ids.shape[1] - seq_len)
        tmp_ids = tokenized_sample.input_ids[:, j: j + seq_len]
        if add_bos_to_every:
            tmp_ids = torch.cat((torch.LongTensor([[tokenizer.bos_token_id]]), tmp_ids[:, :-1]), dim=1)
        tokenized_samples.append(tmp_ids)
    return torch.cat(tokenized_samples, dim=0)


@pytest.mark.parametrize("bos", ["special_tokens", "every"])
def test_calibration_equals_the_official_sampler(bos, smollm2_dir, wiki_path):
    """Same rows (Wikipedia paragraphs, empty and short ones included), same seed: the same token ids.
    The tokenizer adds a BOS like LLaMA's, so `special_tokens` windows may start with it."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    rows = load_documents(str(wiki_path), keep_empty=True)
    for seq_len in (128, 512):
        ours = sample_calibration(rows, tokenizer, 10, seq_len, seed=1234, bos=bos)
        official = _official_get_examples(rows, tokenizer, 10, seq_len, add_bos_to_every=bos == "every")
        assert torch.equal(ours, official)
    assert (ours[:, 0] == tokenizer.bos_token_id).all() == (bos == "every")


def _official_gptq_dataset(rows, tokenizer, nsamples, seqlen, buffer_size=5000):
    """shortened-llm src/quantize_gptq.py get_dataset, transcribed line by line (after set_seed(0))."""
    random.seed(0)
    all_text = "\n\n".join(rows[:buffer_size])
    encoding = tokenizer(all_text, return_tensors="pt")
    dataset = []
    for _ in range(nsamples):
        i = random.randint(0, encoding.input_ids.shape[1] - seqlen - 1)
        dataset.append(encoding.input_ids[:, i:i + seqlen])
    return torch.cat(dataset, dim=0)


def test_concatenated_calibration_equals_the_official_gptq_sampler(smollm2_dir):
    """The official GPTQ calibration: C4 rows joined, one tokenization (BOS at the start only, LLaMA-like
    here), windows anywhere in the stream; the same ids for the same rows, seed and length."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    rows = load_documents("embedded:c4_demo.jsonl", keep_empty=True)
    for seq_len, buffer in ((2048, 5000), (256, 40)):
        ours = sample_concatenated(rows, tokenizer, 16, seq_len, seed=0, max_rows=buffer)
        assert torch.equal(ours, _official_gptq_dataset(rows, tokenizer, 16, seq_len, buffer))
    every = sample_concatenated(rows, tokenizer, 4, 256, seed=0, bos="every", max_rows=40)
    assert (every[:, 0] == tokenizer.bos_token_id).all() and not (ours[1:, 0] == tokenizer.bos_token_id).any()
    with pytest.raises(CalibrationError, match="fewer than one window of 2048"):
        sample_concatenated(rows[:3], tokenizer, 1, 2048, seed=0)


def test_dataset_repository_goes_through_datasets(tmp_path):
    """A dataset name is read with `datasets.load_dataset`; a local repository has the same layout."""
    repo = tmp_path / "my-corpus"
    (repo / "data").mkdir(parents=True)
    rows = [{"text": f"row {i}", "other": i} for i in range(5)]
    (repo / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(str(repo), split="train") == [f"row {i}" for i in range(5)]
    with pytest.raises(TextSourceError, match="has no column 'body'"):
        load_documents(str(repo), text_field="body")
    with pytest.raises(TextSourceError, match="could not load text source"):
        load_documents(str(tmp_path / "no-such-dataset"))
