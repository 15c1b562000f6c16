"""Alpaca instruction data for LoRA: records, the Alpaca prompt template, tokenized examples.

Records are `{"instruction", "input", "output"}` (the original Alpaca and yahma/alpaca-cleaned,
the paper's "refined Alpaca"), from a local .json (a list) or .jsonl file or a Hugging Face
dataset name. A record without an instruction or output, or one that is not an object, is
skipped and counted by reason; a missing `input` means none. Prompts follow tloen/alpaca-lora
(as LLM-Pruner and the paper's code): the tokenized prompt + response is cut at `cutoff_len`, EOS
is appended when it fits, and unless `train_on_inputs` the prompt tokens get label -100 so the
loss is on the response only.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.embedded import resolve_text
from data.nll import IGNORE_INDEX
from data.shards import tokenizer_fingerprint

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class AlpacaDataError(ValueError):
    """The instruction data is missing, unreadable or holds no usable record."""


@dataclass
class AlpacaRecords:
    records: list[dict]
    skipped: Counter = field(default_factory=Counter)
    digest: str = ""
    rows: list[int] = field(default_factory=list)  # each record's row in the source (skipped rows count)
    total_rows: int = 0


def prompt_for(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def _raw_records(source: str, split: str) -> list:
    path = Path(resolve_text(source))
    if path.suffix in (".json", ".jsonl") or path.is_file():
        if not path.is_file():
            raise AlpacaDataError(f"instruction data {path} does not exist: give an Alpaca .json/.jsonl file or a "
                                  "Hugging Face dataset name such as yahma/alpaca-cleaned")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                return [json.loads(line) if line.strip() else None for line in text.splitlines()]
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise AlpacaDataError(f"{path} is not valid JSON ({err}): an Alpaca file is a JSON list of "
                                  "{instruction, input, output} records, or one record per line (.jsonl)") from err
        if not isinstance(loaded, list):
            raise AlpacaDataError(f"{path} holds a JSON {type(loaded).__name__}, not a list of records")
        return loaded
    import datasets

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as err:  # the hub, a missing dataset or a bad split all surface here
        raise AlpacaDataError(f"could not load instruction data {source!r} (split {split!r}): {err}. Offline, give "
                              "a local Alpaca .json/.jsonl file") from err


def load_alpaca(source: str, split: str = "train") -> AlpacaRecords:
    """Usable records, in order, and the count of skipped ones per reason."""
    result = AlpacaRecords([])
    for row, raw in enumerate(_raw_records(source, split)):
        result.total_rows += 1
        if not isinstance(raw, dict):
            result.skipped["not_a_record"] += 1
            continue
        missing = [k for k in ("instruction", "output") if not isinstance(raw.get(k), str) or not raw[k].strip()]
        if missing:
            result.skipped[f"missing_{missing[0]}"] += 1
            continue
        result.records.append({"instruction": raw["instruction"], "input": raw.get("input") or "",
                               "output": raw["output"]})
        result.rows.append(row)
    if not result.records:
        raise AlpacaDataError(f"{source} holds no usable Alpaca record (skipped: {dict(result.skipped)}); records "
                              "need instruction and output fields")
    result.digest = hashlib.sha256(json.dumps(result.records, sort_keys=True).encode()).hexdigest()
    return result


def tokenize_example(record: dict, tokenizer, cutoff_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    prompt = prompt_for(record)
    ids = tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)["input_ids"]
    if len(ids) < cutoff_len and ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return {"input_ids": ids, "labels": labels}


class AlpacaExamples(Dataset):
    """Tokenized examples; the fingerprint covers records, tokenizer and tokenization settings."""

    def __init__(self, records: list[dict], tokenizer, cutoff_len: int, train_on_inputs: bool):
        examples = [tokenize_example(r, tokenizer, cutoff_len, train_on_inputs) for r in records]
        # a prompt that fills the whole cutoff leaves no response token to learn from (and a 0/0 loss)
        self.examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:])]
        self.truncated_away = len(examples) - len(self.examples)
        if not self.examples:
            raise AlpacaDataError(f"every prompt is longer than cutoff_len={cutoff_len} tokens: raise data.cutoff_len")
        settings = json.dumps([cutoff_len, train_on_inputs, tokenizer_fingerprint(tokenizer)])
        self.fingerprint = hashlib.sha256(
            (settings + json.dumps(records, sort_keys=True)).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def pad_collate(pad_id: int):
    """Right-pad a micro-batch to its longest example; padding is masked out of attention and loss."""

    def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
                 "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)}
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(example["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(example["labels"])
        return batch

    return collate


def split_validation(alpaca: AlpacaRecords, size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / validation records, holding out exactly the rows the official run held out:
    `datasets`' train_test_split(test_size=size, shuffle=True, seed=seed) over the source's rows
    (shortened-llm src/lora_retrain.py: 2,000 rows, seed 42). Held-out rows we skip as unusable
    leave the validation set a little smaller, never the training set larger."""
    import datasets

    if size >= alpaca.total_rows:
        raise AlpacaDataError(f"val_size={size} leaves no training data from {alpaca.total_rows} records: lower "
                              "data.val_size")
    rows = datasets.Dataset.from_dict({"row": list(range(alpaca.total_rows))})
    held = set(rows.train_test_split(test_size=size, shuffle=True, seed=seed)["test"]["row"])
    pairs = list(zip(alpaca.rows, alpaca.records, strict=True))
    return [r for row, r in pairs if row not in held], [r for row, r in pairs if row in held]
