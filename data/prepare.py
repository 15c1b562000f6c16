"""The data stage: tokenize a corpus in parallel into token shards with a manifest.

One input file becomes one shard per split (train, and validation when `validation_fraction` > 0),
so work divides across processes and Slurm array tasks by file, and a re-run skips every shard
whose record exists. The manifest is written last: its presence means the data set is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data.artifacts import library_versions, write_json_atomic
from data.config import ConfigError, to_dict
from data.corpus import SKIP_REASONS, CorpusError, discover_inputs, read_documents
from data.embedded import resolve_model, resolve_text
from data.shards import (
    FORMAT,
    MANIFEST,
    DataMismatchError,
    ShardWriter,
    manifest_fingerprint,
    read_shard_record,
    token_dtype,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")
RUN_RECORD = "prepare_run.json"
_MAX_BATCH_CHARS = 1 << 21  # bounds the tokenizer's working memory when documents are whole books


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=lambda: ["embedded:c4_demo.jsonl", "embedded:books.jsonl"])
    input_split: str = "train"
    output_dir: Path = Path("outputs/tokens")
    tokenizer: str = "embedded:smollm2-135m"
    text_field: str = "text"
    set_field: str = "meta.redpajama_set_name"
    add_bos: bool = True
    add_eos: bool = True
    include_sets: list[str] = field(default_factory=list)
    exclude_sets: list[str] = field(default_factory=list)
    validation_fraction: float = 0.0
    num_workers: int = 2
    batch_documents: int = 256
    shard_index: int = 0
    num_shards: int = 1
    merge: bool = False
    overwrite: bool = False

    __field_docs__ = {
        "inputs": "files, globs or a SlimPajama root (then input_split picks <root>/<split>/chunk*/)",
        "tokenizer": "the model's tokenizer: a checkpoint directory (the pruned model) or hub name",
        "include_sets": "keep only these source sets (meta.redpajama_set_name), e.g. [RedPajamaC4]",
        "exclude_sets": "drop these source sets, e.g. [RedPajamaGithub]",
        "validation_fraction": "share of documents held out (by a hash of the text) into the validation split",
        "shard_index": "this part's index when the corpus is split across num_shards jobs (Slurm array)",
        "merge": "only merge the manifests of num_shards finished parts into manifest.json",
    }

    def validate(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError("validation_fraction must be in [0, 1)")
        if self.num_workers < 1 or self.batch_documents < 1:
            raise ConfigError("num_workers and batch_documents must be at least 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index must be in 0..num_shards-1 (got {self.shard_index} of {self.num_shards})")
        if self.include_sets and self.exclude_sets:
            raise ConfigError("set include_sets or exclude_sets, not both")


def _part_name(config: PrepareConfig) -> str:
    if config.num_shards == 1:
        return MANIFEST
    return f"manifest.part-{config.shard_index:05d}-of-{config.num_shards:05d}.json"


# --- worker side -----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, settings: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _WORKER["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_path)
    _WORKER.update(settings)


def _is_validation(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _keep_set(source_set: str) -> bool:
    include, exclude = _WORKER["include_sets"], _WORKER["exclude_sets"]
    return (not include or source_set in include) and source_set not in exclude


def _encode(texts: list[str]) -> list[list[int]]:
    tokenizer = _WORKER["tokenizer"]
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if _WORKER["add_bos"] else []
    suffix = [tokenizer.eos_token_id] if _WORKER["add_eos"] else []
    return [prefix + ids + suffix for ids in encoded]


def _tokenize_file(task: tuple[int, str]) -> dict:
    """Tokenize one input file into its shards; returns their records or the error."""
    index, path = task
    out, dtype = Path(_WORKER["output_dir"]), np.dtype(_WORKER["dtype"])
    name = f"{index:06d}"
    writers = {split: ShardWriter(out / split, name, dtype) for split in _WORKER["splits"]}
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    try:
        batch: list[tuple[str, str]] = []
        batch_chars = 0

        def flush() -> None:
            for (text, source_set), ids in zip(batch, _encode([t for t, _ in batch]), strict=True):
                split = "validation" if _is_validation(text, _WORKER["validation_fraction"]) else "train"
                writers[split].add(ids, source_set)
            batch.clear()

        for doc in read_documents(Path(path), skipped, _WORKER["text_field"], _WORKER["set_field"]):
            if not _keep_set(doc.source_set):
                filtered[doc.source_set] += 1
                continue
            batch.append((doc.text, doc.source_set))
            batch_chars += len(doc.text)
            if len(batch) >= _WORKER["batch_documents"] or batch_chars >= _MAX_BATCH_CHARS:
                flush()
                batch_chars = 0
        flush()
    except (CorpusError, OSError) as err:
        for writer in writers.values():
            writer.abort()
        return {"index": index, "error": str(err)}
    extra = {"source": str(path), "skipped": dict(skipped), "filtered_sets": dict(filtered)}
    return {"index": index, "records": {split: w.commit(extra) for split, w in writers.items()}}


# --- driver side -----------------------------------------------------------------------------

def _check_run_record(config: PrepareConfig, out: Path, fingerprint: str, files: list[Path]) -> None:
    """A resumed run must be the same run: same tokenizer, framing, filters and inputs."""
    record = {"tokenizer_fingerprint": fingerprint, "add_bos": config.add_bos, "add_eos": config.add_eos,
              "include_sets": config.include_sets, "exclude_sets": config.exclude_sets,
              "validation_fraction": config.validation_fraction, "text_field": config.text_field,
              "inputs": [str(f) for f in files], "num_shards": config.num_shards}
    path = out / RUN_RECORD
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed:
            raise DataMismatchError(f"{out} holds an unfinished run with different settings ({', '.join(changed)}); "
                                    "use the same settings to continue it, or another output_dir")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)


def prepare(config: PrepareConfig) -> Path:
    """Tokenize this part of the corpus (or merge parts); returns the manifest path written."""
    out = Path(config.output_dir)
    if config.merge:
        return merge_parts(config)
    manifest_path = out / _part_name(config)
    if manifest_path.exists():
        if not config.overwrite:
            raise FileExistsError(f"{manifest_path} exists: this data is complete. Choose another output_dir, "
                                  "or set overwrite=true to tokenize again")
        shutil.rmtree(out)
    files = discover_inputs([resolve_text(s) for s in config.inputs], config.input_split)
    mine = [(i, str(f)) for i, f in enumerate(files) if i % config.num_shards == config.shard_index]
    from transformers import AutoTokenizer

    tokenizer_path = resolve_model(config.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    _check_run_record(config, out, fingerprint, files)
    splits = ["train", "validation"] if config.validation_fraction > 0 else ["train"]
    dtype = token_dtype(len(tokenizer))
    settings = {"output_dir": str(out), "dtype": dtype.str, "splits": splits,
                **{k: getattr(config, k) for k in ("add_bos", "add_eos", "include_sets", "exclude_sets",
                                                    "validation_fraction", "text_field", "set_field",
                                                    "batch_documents")}}
    done = {i: {s: read_shard_record(out / s, f"{i:06d}") for s in splits} for i, _ in mine}
    done = {i: r for i, r in done.items() if all(r.values())}
    todo = [task for task in mine if task[0] not in done]
    if done:
        log.warning("continuing in %s: %d of %d files already tokenized", out, len(done), len(mine))
    errors = _run_tasks(todo, tokenizer_path, settings, config.num_workers, done)
    if errors:
        raise CorpusError(f"{len(errors)} input file(s) failed (finished shards are kept; fix or remove them and "
                          "run again):\n" + "\n".join(errors[:20]))
    manifest = build_manifest(config, tokenizer, fingerprint, dtype, [done[i] for i, _ in mine], len(files))
    write_json_atomic(manifest_path, manifest)
    return manifest_path


def _run_tasks(todo: list[tuple[int, str]], tokenizer_path: str, settings: dict, workers: int,
               done: dict) -> list[str]:
    errors = []
    tokens = documents = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="tokenizing", unit="file")

    def collect(result: dict) -> None:
        nonlocal tokens, documents
        if "error" in result:
            errors.append(result["error"])
        else:
            done[result["index"]] = result["records"]
            tokens += sum(r["tokens"] for r in result["records"].values())
            documents += sum(r["documents"] for r in result["records"].values())
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs_s=f"{documents / elapsed:,.0f}", tokens_s=f"{tokens / elapsed:,.0f}")
        bar.update()

    if workers == 1 or len(todo) <= 1:
        _init_worker(tokenizer_path, settings)
        for task in todo:
            collect(_tokenize_file(task))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, settings)) as pool:
            for result in pool.imap_unordered(_tokenize_file, todo):
                collect(result)
    bar.close()
    return errors


def summarize_shards(shards_by_split: dict[str, list[dict]]) -> dict:
    """The manifest's totals, all derived from the shard records: per split, per source set, and
    skipped/filtered records (counted once per input file, from its train shard)."""
    splits, sets = {}, {}
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    for split, shards in shards_by_split.items():
        shards = sorted(shards, key=lambda r: r["name"])
        splits[split] = {"shards": shards, "tokens": sum(r["tokens"] for r in shards),
                         "documents": sum(r["documents"] for r in shards)}
        for record in shards:
            for name, count in record["set_tokens"].items():
                stats = sets.setdefault(name, {"documents": 0, "tokens": 0})
                stats["tokens"] += count
                stats["documents"] += record["set_documents"][name]
            if split == "train":
                skipped.update(record["skipped"])
                filtered.update(record["filtered_sets"])
    return {"splits": splits, "sets": sets,
            "skipped": {reason: skipped.get(reason, 0) for reason in sorted(set(skipped) | set(SKIP_REASONS))},
            "filtered_sets": dict(filtered)}


def build_manifest(config: PrepareConfig, tokenizer, fingerprint: str, dtype: np.dtype,
                   records: list[dict], num_inputs: int) -> dict:
    shards_by_split = {split: [per_file[split] for per_file in records] for split in (records[0] if records else {})}
    summary = summarize_shards(shards_by_split)
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": {"name": config.tokenizer, "fingerprint": fingerprint, "bos_id": tokenizer.bos_token_id,
                      "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)},
        "framing": {"add_bos": config.add_bos, "add_eos": config.add_eos},
        **summary,
        "num_input_files": num_inputs,
        "part": None if config.num_shards == 1 else {"index": config.shard_index, "count": config.num_shards},
        "fingerprint": manifest_fingerprint(fingerprint, summary["splits"]),
        "config": to_dict(config),
        "versions": library_versions(("tokenizers", "transformers", "numpy", "zstandard")),
    }


def merge_parts(config: PrepareConfig) -> Path:
    """One manifest over the parts written by `num_shards` jobs into the same output_dir."""
    out = Path(config.output_dir)
    parts = []
    for index in range(config.num_shards):
        path = out / f"manifest.part-{index:05d}-of-{config.num_shards:05d}.json"
        if not path.exists():
            raise DataMismatchError(f"cannot merge: part {index} of {config.num_shards} is missing ({path}); "
                                    "run that part first")
        parts.append(json.loads(path.read_text()))
    if len({p["tokenizer"]["fingerprint"] for p in parts}) != 1:
        raise DataMismatchError("cannot merge: the parts were tokenized with different tokenizers")
    shards_by_split: dict[str, list[dict]] = {}
    for part in parts:
        for split, entry in part["splits"].items():
            shards_by_split.setdefault(split, []).extend(entry["shards"])
    summary = summarize_shards(shards_by_split)
    merged = {**parts[0], **summary, "part": None, "merged_parts": config.num_shards,
              "fingerprint": manifest_fingerprint(parts[0]["tokenizer"]["fingerprint"], summary["splits"])}
    write_json_atomic(out / MANIFEST, merged)
    return out / MANIFEST
