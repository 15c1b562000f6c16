"""Token shards on disk and the manifest that describes them.

Tokenization writes one *piece* per input file and split (`pieces/<split>/<file index>.*`), then
concatenates the pieces of a group of consecutive input files, in file order, into one *shard*
(`<split>/<shard index>.*`) of about `shard_tokens` tokens, and deletes the pieces. Both are the
same three files: `.tokens` (a flat uint16 or uint32 token array, raw), `.docs.npy` (int64
document start offsets, plus the total length at the end) and `.sets.npy` (uint16 id of each
document's source set, into the record's `sets` list), and a `.json` record written last: one
without its record is incomplete and is redone.

Documents are grouped by source set (format 3): a piece holds its file's documents set by set, in
the order of its `sets` list (file order within a set), and a shard holds, set by set in the order
of its own `sets` list, that set's documents from each of its pieces in file order. So a set's
tokens are one contiguous range of each shard, found from the record's `sets` and `set_tokens`
alone: a training rank can cut sequences of one set (`data/packed.py`) without any per-document
index.

A shard's `.json` keeps the per-input-file bookkeeping (`inputs`: source, counts, skipped records)
that only resumption and audits need; `manifest.json` holds one small record per shard, which is
all a training rank reads (parsed once per process).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "shorten-tokens/3"  # 3: documents grouped by source set within each shard
_COPY_BLOCK = 1 << 24


class DataMismatchError(ValueError):
    """Token data does not match what the consumer expects (tokenizer, format, completeness)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the full tokenizer definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps({"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                          "special": sorted(map(str, tokenizer.all_special_tokens))})
    return hashlib.sha256((body + special).encode()).hexdigest()


def _commit_arrays(directory: Path, name: str, tokens_tmp: Path, offsets: np.ndarray, set_ids: np.ndarray,
                   record: dict) -> dict:
    """Rename a finished token file into place beside its offsets and set ids; the record goes last."""
    base = directory / name
    np.save(directory / f".{name}.docs.tmp.npy", offsets.astype(np.int64, copy=False))
    np.save(directory / f".{name}.sets.tmp.npy", set_ids.astype(np.uint16, copy=False))
    os.replace(tokens_tmp, f"{base}.tokens")
    os.replace(directory / f".{name}.docs.tmp.npy", f"{base}.docs.npy")
    os.replace(directory / f".{name}.sets.tmp.npy", f"{base}.sets.npy")
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, f"{base}.json")
    return record


def _copy_range(source, start: int, stop: int, out, digest=None) -> None:
    """Bytes [start, stop) of the open file `source` to `out`, in blocks (a range may be gigabytes)."""
    source.seek(start)
    left = stop - start
    while left > 0:
        block = source.read(min(_COPY_BLOCK, left))
        if not block:
            raise OSError(f"{source.name} ends at byte {stop - left}, before {stop}")
        if digest is not None:
            digest.update(block)
        out.write(block)
        left -= len(block)


def _group_by_set(path: Path, lengths: np.ndarray, set_ids: np.ndarray, itemsize: int) -> np.ndarray:
    """Rewrite the token file `path` (documents in file order) with its documents grouped by set id,
    file order kept within a set; returns that order. Runs of documents that stay neighbours are
    copied at once, so a file already grouped costs nothing."""
    order = np.argsort(set_ids, kind="stable")
    if np.all(order[1:] == order[:-1] + 1):
        return order
    starts = np.concatenate([[0], np.cumsum(lengths)]) * itemsize
    grouped = path.with_name(path.name + ".grouped")
    with open(path, "rb") as source, open(grouped, "wb") as out:
        for run in np.split(order, np.flatnonzero(np.diff(order) != 1) + 1):
            _copy_range(source, int(starts[run[0]]), int(starts[run[-1] + 1]), out)
    os.replace(grouped, path)
    return order


def _set_counts(sets: list[str], set_ids: np.ndarray, offsets: np.ndarray) -> tuple[dict, dict]:
    lengths = np.diff(offsets)
    documents = np.bincount(set_ids, minlength=len(sets)).tolist()
    tokens = np.bincount(set_ids, weights=lengths, minlength=len(sets)).astype(np.int64).tolist()
    return dict(zip(sets, tokens, strict=True)), dict(zip(sets, documents, strict=True))


class PieceWriter:
    """Appends one input file's documents (of one split) under a temporary name; `commit` renames."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, dtype
        directory.mkdir(parents=True, exist_ok=True)
        self._tmp = directory / f".{name}.tokens.tmp"
        self._file = open(self._tmp, "wb")
        self._lengths: list[int] = []
        self._set_ids: list[int] = []
        self._sets: dict[str, int] = {}

    def add(self, tokens: np.ndarray, source_set: str) -> None:
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(len(tokens))
        self._set_ids.append(self._sets.setdefault(source_set, len(self._sets)))

    def commit(self, extra: dict) -> dict:
        self._file.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        set_ids = np.asarray(self._set_ids, dtype=np.uint16)
        order = _group_by_set(self._tmp, lengths, set_ids, self.dtype.itemsize)
        offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
        set_ids = set_ids[order]
        record = {"name": self.name, "tokens": int(offsets[-1]), "documents": len(self._set_ids),
                  "sets": list(self._sets), **extra}
        return _commit_arrays(self.directory, self.name, self._tmp, offsets, set_ids, record)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._tmp.with_name(self._tmp.name + ".grouped").unlink(missing_ok=True)


def read_record(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def remove_arrays(directory: Path, name: str) -> None:
    """Delete a piece or shard, its record first (so a half-deleted one reads as unfinished)."""
    for suffix in (".json", ".tokens", ".docs.npy", ".sets.npy"):
        (directory / f"{name}{suffix}").unlink(missing_ok=True)


def assemble_shard(directory: Path, name: str, pieces: list[tuple[Path, dict]]) -> dict:
    """Concatenate pieces into shard `name`, set by set (each set's documents from every piece, in the
    given order); returns the manifest's record for it. The shard's own `.json` also lists the pieces'
    records (`inputs`: per-input-file bookkeeping)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tokens.tmp"
    digest = hashlib.sha256()
    sets: dict[str, int] = {}
    loaded = []  # (token file, document offsets, the shard's set id of each document)
    for piece_dir, record in pieces:
        base = piece_dir / record["name"]
        remap = np.asarray([sets.setdefault(s, len(sets)) for s in record["sets"]], dtype=np.uint16)
        loaded.append((f"{base}.tokens", np.load(f"{base}.docs.npy"), remap[np.load(f"{base}.sets.npy")]))
    ends, set_ids, total = [np.zeros(1, dtype=np.int64)], [], 0
    with open(tmp, "wb") as out:
        for set_id in range(len(sets)):
            for tokens, offsets, ids in loaded:
                documents = np.flatnonzero(ids == set_id)
                if not len(documents):
                    continue
                first, last = int(documents[0]), int(documents[-1]) + 1  # contiguous: pieces are grouped
                if offsets[last] > offsets[first]:
                    itemsize = os.path.getsize(tokens) // int(offsets[-1])
                    with open(tokens, "rb") as source:
                        _copy_range(source, int(offsets[first]) * itemsize, int(offsets[last]) * itemsize, out,
                                    digest)
                ends.append(offsets[first + 1:last + 1] - offsets[first] + total)
                set_ids.append(ids[first:last])
                total += int(offsets[last] - offsets[first])
    all_offsets = np.concatenate(ends)
    all_set_ids = np.concatenate(set_ids) if set_ids else np.zeros(0, dtype=np.uint16)
    set_tokens, set_documents = _set_counts(list(sets), all_set_ids, all_offsets)
    skipped: dict[str, int] = {}
    filtered: dict[str, int] = {}
    for _, record in pieces:
        for counts_total, counts in ((skipped, record["skipped"]), (filtered, record["filtered_sets"])):
            for key, count in counts.items():
                counts_total[key] = counts_total.get(key, 0) + count
    summary = {"name": name, "tokens": int(all_offsets[-1]), "documents": len(all_set_ids),
               "sha256": digest.hexdigest(), "sets": list(sets), "set_tokens": set_tokens,
               "set_documents": set_documents, "skipped": skipped, "filtered_sets": filtered,
               "input_files": len(pieces)}
    _commit_arrays(directory, name, tmp, all_offsets, all_set_ids,
                   {**summary, "inputs": [record for _, record in pieces]})
    return summary


def set_ranges(record: dict) -> list[tuple[str, int, int]]:
    """(set, first token, end token) of each source set's contiguous range in a shard, from its record."""
    ranges, start = [], 0
    for name in record["sets"]:
        stop = start + record["set_tokens"][name]
        ranges.append((name, start, stop))
        start = stop
    return ranges


def shard_summary(record: dict) -> dict:
    """What the manifest keeps of a shard's record: everything but the per-input-file list."""
    return {k: v for k, v in record.items() if k != "inputs"}


@functools.lru_cache(maxsize=8)
def _parse_manifest(path: str, mtime_ns: int, size: int) -> dict:
    return json.loads(Path(path).read_text())


@dataclass
class Manifest:
    path: Path
    data: dict

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """The manifest of a tokenized directory, parsed once per process (while the file is unchanged);
        `data` is shared between callers: read it, never modify it."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise DataMismatchError(f"{path} does not exist: run launch/prepare_data.py first (and its merge "
                                    "step if it ran as several parts)")
        stat = path.stat()
        data = _parse_manifest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if data.get("format") != FORMAT:
            raise DataMismatchError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r} (documents "
                                    "grouped by source set, which data.mixture needs): tokenize the data again "
                                    "with this version (launch/prepare_data.py)")
        return cls(path, data)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"])

    def shards(self, split: str) -> list[dict]:
        if split not in self.data["splits"]:
            raise DataMismatchError(f"{self.path} has no split {split!r}; it has {sorted(self.data['splits'])}")
        return self.data["splits"][split]["shards"]

    def check_tokenizer(self, tokenizer) -> None:
        expected = self.data["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint(tokenizer) != expected:
            raise DataMismatchError(
                f"the data in {self.directory} was tokenized with another tokenizer "
                f"({self.data['tokenizer'].get('name')}, fingerprint {expected[:12]}): tokenize it again with "
                "the model's tokenizer (launch/prepare_data.py tokenizer=<model dir>)")


def manifest_fingerprint(tokenizer_fp: str, splits: dict) -> str:
    digest = hashlib.sha256(tokenizer_fp.encode())
    for split in sorted(splits):
        for shard in splits[split]["shards"]:
            digest.update(f"{split}/{shard['name']}:{shard['sha256']}".encode())
    return digest.hexdigest()
