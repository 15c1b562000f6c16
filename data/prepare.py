"""The data stage: tokenize a corpus in parallel into token shards with a manifest.

Input files are taken in sorted order and grouped, consecutively, into shards of about
`shard_tokens` tokens (estimated from the files' sizes, so the grouping is known before any file is
read and does not depend on workers or array parts). Each input file is tokenized on its own into a
piece (one per split); when every file of a group has its piece, the pieces are concatenated in file
order into the group's shard and deleted. A re-run redoes only the files without a piece and the
groups without a shard; the output is the same whatever was interrupted and whatever the number of
workers. Slurm array parts take whole groups (round-robin), so they write disjoint shards. The
manifest is written last: its presence means the data set is complete.
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
from data.corpus import SKIP_REASONS, CorpusError, discover_inputs, file_set, read_documents
from data.embedded import resolve_model, resolve_text
from data.shards import (
    FORMAT,
    MANIFEST,
    DataMismatchError,
    PieceWriter,
    assemble_shard,
    manifest_fingerprint,
    read_record,
    remove_arrays,
    shard_summary,
    token_dtype,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")
RUN_RECORD = "prepare_run.json"
PIECES = "pieces"
_MAX_BATCH_CHARS = 1 << 21  # bounds the tokenizer's working memory when documents are whole books
# Tokens per byte of input, to group files into shards before reading them: SlimPajama-627B holds
# 627e9 LLaMA tokens in 895 GB of .jsonl.zst; uncompressed English text is ~4 bytes per token.
_TOKENS_PER_BYTE = {"zst": 0.7, "plain": 0.25}


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=lambda: ["embedded:c4_demo.jsonl", "embedded:books.jsonl"])
    input_split: str = "train"
    output_dir: Path = Path("outputs/tokens")
    tokenizer: str = "embedded:smollm2-135m"
    text_field: str = "text"
    set_field: str = "meta.redpajama_set_name"
    set_by_file: dict[str, str] = field(default_factory=dict)
    add_bos: bool = True
    add_eos: bool = True
    include_sets: list[str] = field(default_factory=list)
    exclude_sets: list[str] = field(default_factory=list)
    validation_fraction: float = 0.0
    shard_tokens: int = 1_000_000_000
    num_workers: int = 2
    batch_documents: int = 256
    shard_index: int = 0
    num_shards: int = 1
    merge: bool = False
    overwrite: bool = False

    __field_docs__ = {
        "inputs": "files, globs or a SlimPajama root (then input_split picks <root>/<split>/chunk*/)",
        "tokenizer": "the model's tokenizer: a checkpoint directory (the pruned model) or hub name",
        "set_field": "dotted field of a record that names its source set (SlimPajama's meta.redpajama_set_name)",
        "set_by_file": "source set of records without set_field (and of .txt lines) by input file name: {glob: set}, "
                       "first match wins, e.g. {'c4*': RedPajamaC4}; unmatched ones: unknown (.txt: text)",
        "include_sets": "keep only these source sets (meta.redpajama_set_name), e.g. [RedPajamaC4]",
        "exclude_sets": "drop these source sets, e.g. [RedPajamaGithub]",
        "validation_fraction": "share of documents held out (by a hash of the text) into the validation split",
        "shard_tokens": "about this many train tokens per shard (1e9 = 2 GB of uint16), from whole input files",
        "shard_index": "this part's index when the corpus is split across num_shards jobs (Slurm array)",
        "merge": "only merge the manifests of num_shards finished parts into manifest.json",
    }

    def validate(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError("validation_fraction must be in [0, 1)")
        if self.num_workers < 1 or self.batch_documents < 1 or self.shard_tokens < 1:
            raise ConfigError("num_workers, batch_documents and shard_tokens must be at least 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index must be in 0..num_shards-1 (got {self.shard_index} of {self.num_shards})")
        if self.include_sets and self.exclude_sets:
            raise ConfigError("set include_sets or exclude_sets, not both")
        for pattern, name in self.set_by_file.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"set_by_file[{pattern!r}] must name a source set, e.g. {{{pattern!r}: RedPajamaC4}}")


def _part_name(config: PrepareConfig) -> str:
    if config.num_shards == 1:
        return MANIFEST
    return f"manifest.part-{config.shard_index:05d}-of-{config.num_shards:05d}.json"


def _name(index: int) -> str:
    return f"{index:06d}"


def plan_shards(files: list[Path], shard_tokens: int) -> list[int]:
    """Index of each shard's first input file: consecutive files until their estimated tokens reach
    `shard_tokens`. It depends on the file list and sizes only, so every array part agrees on it."""
    starts, estimate = [0], 0.0
    for index, path in enumerate(files):
        if estimate >= shard_tokens:
            starts.append(index)
            estimate = 0.0
        estimate += path.stat().st_size * _TOKENS_PER_BYTE["zst" if path.name.endswith(".zst") else "plain"]
    return starts


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
    """Tokenize one input file into its pieces (one per split); returns their records or the error."""
    index, path = task
    out, dtype = Path(_WORKER["output_dir"]), np.dtype(_WORKER["dtype"])
    writers = {split: PieceWriter(out / PIECES / split, _name(index), dtype) for split in _WORKER["splits"]}
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    try:
        batch: list[tuple[str, str]] = []
        batch_chars = 0

        def flush() -> None:
            for (text, source_set), ids in zip(batch, _encode([t for t, _ in batch]), strict=True):
                split = "validation" if _is_validation(text, _WORKER["validation_fraction"]) else "train"
                writers[split].add(np.asarray(ids, dtype=dtype), source_set)
            batch.clear()

        default_set = file_set(Path(path), _WORKER.get("set_by_file") or {})
        for doc in read_documents(Path(path), skipped, _WORKER["text_field"], _WORKER["set_field"], default_set):
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

def _check_run_record(config: PrepareConfig, out: Path, fingerprint: str, files: list[Path]) -> list[int]:
    """A resumed run must be the same run: same tokenizer, framing, filters, inputs and shard size.
    Returns the shard plan (first input file of each shard), fixed by the first run: a re-downloaded
    file of another size must not move files between shards that are already written."""
    record = {"format": FORMAT, "tokenizer_fingerprint": fingerprint, "add_bos": config.add_bos,
              "add_eos": config.add_eos, "set_field": config.set_field, "set_by_file": config.set_by_file,
              "include_sets": config.include_sets, "exclude_sets": config.exclude_sets,
              "validation_fraction": config.validation_fraction, "text_field": config.text_field,
              "shard_tokens": config.shard_tokens, "inputs": [str(f) for f in files],
              "num_shards": config.num_shards}
    path = out / RUN_RECORD
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed:
            raise DataMismatchError(f"{out} holds an unfinished run with different settings ({', '.join(changed)}); "
                                    "use the same settings to continue it, or another output_dir")
        return previous["shard_starts"]
    out.mkdir(parents=True, exist_ok=True)
    record["shard_starts"] = plan_shards(files, config.shard_tokens)
    write_json_atomic(path, record)
    return record["shard_starts"]


class _ShardAssembler:
    """Turns finished pieces into shards as soon as every input file of a shard has its piece."""

    def __init__(self, out: Path, splits: list[str], groups: dict[int, range]):
        self.out, self.splits, self.groups = out, splits, groups
        self.pieces: dict[int, dict[str, dict]] = {}
        self.shards: dict[int, dict[str, dict]] = {}

    def finished_shard(self, group: int) -> dict[str, dict] | None:
        records = {split: read_record(self.out / split, _name(group)) for split in self.splits}
        return {s: shard_summary(r) for s, r in records.items()} if all(records.values()) else None

    def finished_piece(self, index: int) -> dict[str, dict] | None:
        records = {split: read_record(self.out / PIECES / split, _name(index)) for split in self.splits}
        return records if all(records.values()) else None

    def add(self, group: int, index: int, records: dict[str, dict]) -> None:
        self.pieces[index] = records
        if all(i in self.pieces for i in self.groups[group]):
            self.assemble(group)

    def assemble(self, group: int) -> None:
        files = self.groups[group]
        self.shards[group] = {
            split: assemble_shard(self.out / split, _name(group),
                                  [(self.out / PIECES / split, self.pieces[i][split]) for i in files])
            for split in self.splits}
        self.remove_pieces(files)

    def remove_pieces(self, files: range) -> None:
        for index in files:
            self.pieces.pop(index, None)
            for split in self.splits:
                remove_arrays(self.out / PIECES / split, _name(index))


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
    from transformers import AutoTokenizer

    tokenizer_path = resolve_model(config.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    starts = _check_run_record(config, out, fingerprint, files)
    bounds = [*starts, len(files)]
    groups = {g: range(bounds[g], bounds[g + 1]) for g in range(len(starts)) if g % config.num_shards == config.shard_index}
    splits = ["train", "validation"] if config.validation_fraction > 0 else ["train"]
    dtype = token_dtype(len(tokenizer))
    settings = {"output_dir": str(out), "dtype": dtype.str, "splits": splits,
                **{k: getattr(config, k) for k in ("add_bos", "add_eos", "include_sets", "exclude_sets",
                                                    "validation_fraction", "text_field", "set_field",
                                                    "set_by_file", "batch_documents")}}
    assembler = _ShardAssembler(out, splits, groups)
    todo = _resume(assembler, files)
    errors = _run_tasks(todo, tokenizer_path, settings, config.num_workers, assembler)
    if errors:
        raise CorpusError(f"{len(errors)} input file(s) failed (finished files are kept; fix or remove them and "
                          "run again):\n" + "\n".join(errors[:20]))
    if config.num_shards == 1:
        _remove_empty_pieces(out)
    info = {"name": config.tokenizer, "fingerprint": fingerprint, "bos_id": tokenizer.bos_token_id,
            "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}
    shards = {split: [assembler.shards[g][split] for g in sorted(groups)] for split in splits}
    write_json_atomic(manifest_path, build_manifest(config, info, dtype, shards, len(files)))
    return manifest_path


def _resume(assembler: _ShardAssembler, files: list[Path]) -> list[tuple[int, int, str]]:
    """Take over what an interrupted run finished; returns the (group, file index, path) still to do."""
    todo, kept = [], 0
    for group, indices in assembler.groups.items():
        shard = assembler.finished_shard(group)
        if shard is not None:  # its pieces may outlive it if the run stopped right after writing it
            assembler.shards[group] = shard
            assembler.remove_pieces(indices)
            kept += len(indices)
            continue
        for index in indices:
            records = assembler.finished_piece(index)
            if records is None:
                todo.append((group, index, str(files[index])))
            else:
                assembler.pieces[index] = records
                kept += 1
        if all(i in assembler.pieces for i in indices):
            assembler.assemble(group)
    if kept:
        log.warning("continuing in %s: %d of %d files already tokenized", assembler.out, kept,
                    kept + len(todo))
    return todo


def _remove_empty_pieces(out: Path) -> None:
    for directory in [*sorted((out / PIECES).glob("*")), out / PIECES]:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _run_tasks(todo: list[tuple[int, int, str]], tokenizer_path: str, settings: dict, workers: int,
               assembler: _ShardAssembler) -> list[str]:
    errors = []
    tokens = documents = 0
    start = time.perf_counter()
    group_of = {index: group for group, index, _ in todo}
    tasks = [(index, path) for _, index, path in todo]
    bar = tqdm(total=len(tasks), desc="tokenizing", unit="file")

    def collect(result: dict) -> None:
        nonlocal tokens, documents
        if "error" in result:
            errors.append(result["error"])
        else:
            tokens += sum(r["tokens"] for r in result["records"].values())
            documents += sum(r["documents"] for r in result["records"].values())
            assembler.add(group_of[result["index"]], result["index"], result["records"])
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs_s=f"{documents / elapsed:,.0f}", tokens_s=f"{tokens / elapsed:,.0f}", refresh=False)
        bar.update()

    if workers == 1 or len(tasks) <= 1:
        _init_worker(tokenizer_path, settings)
        for task in tasks:
            collect(_tokenize_file(task))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, settings)) as pool:
            for result in pool.imap_unordered(_tokenize_file, tasks):
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


def describe_sets(manifest: dict) -> str:
    """One line: each source set's tokens and share (both splits), what `data.mixture` weights refer to."""
    total = sum(stats["tokens"] for stats in manifest["sets"].values()) or 1
    return "source sets: " + ", ".join(f"{name} {stats['tokens']:,} tokens ({stats['tokens'] / total:.1%})"
                                       for name, stats in sorted(manifest["sets"].items()))


def build_manifest(config: PrepareConfig, tokenizer_info: dict, dtype: np.dtype,
                   shards_by_split: dict[str, list[dict]], num_inputs: int) -> dict:
    """The manifest a loader reads: tokenizer identity (`tokenizer_info`: name, fingerprint, bos_id,
    eos_id, vocab_size), one record per shard, totals, provenance."""
    summary = summarize_shards(shards_by_split)
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": tokenizer_info,
        "framing": {"add_bos": config.add_bos, "add_eos": config.add_eos},
        **summary,
        "num_input_files": num_inputs,
        "part": None if config.num_shards == 1 else {"index": config.shard_index, "count": config.num_shards},
        "fingerprint": manifest_fingerprint(tokenizer_info["fingerprint"], summary["splits"]),
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
    _remove_empty_pieces(out)
    return out / MANIFEST
