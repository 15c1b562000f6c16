"""Token shards on disk and the manifest that describes them.

A shard is three files: `<name>.tokens` (a flat uint16 or uint32 token array, raw), `<name>.docs.npy`
(int64 document start offsets, plus the total length at the end) and `<name>.sets.npy` (uint16 id of
each document's source set, into the shard's `sets` list), and a `<name>.json` record written last:
a shard without its record is incomplete and is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "shorten-tokens/1"


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


class ShardWriter:
    """Appends documents to a shard under temporary names; `commit` renames them into place."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, dtype
        directory.mkdir(parents=True, exist_ok=True)
        self._tmp = directory / f".{name}.tokens.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]
        self._set_ids: list[int] = []
        self._sets: dict[str, int] = {}
        self.set_tokens: dict[str, int] = {}

    def add(self, tokens: list[int], source_set: str) -> None:
        data = np.asarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + len(tokens))
        set_id = self._sets.setdefault(source_set, len(self._sets))
        self._set_ids.append(set_id)
        self.set_tokens[source_set] = self.set_tokens.get(source_set, 0) + len(tokens)

    def commit(self, extra: dict) -> dict:
        self._file.close()
        base = self.directory / self.name
        np.save(self.directory / f".{self.name}.docs.tmp.npy", np.asarray(self._offsets, dtype=np.int64))
        set_ids = np.asarray(self._set_ids, dtype=np.uint16)
        np.save(self.directory / f".{self.name}.sets.tmp.npy", set_ids)
        os.replace(self._tmp, f"{base}.tokens")
        os.replace(self.directory / f".{self.name}.docs.tmp.npy", f"{base}.docs.npy")
        os.replace(self.directory / f".{self.name}.sets.tmp.npy", f"{base}.sets.npy")
        record = {"name": self.name, "tokens": self._offsets[-1], "documents": len(self._set_ids),
                  "sha256": self._hash.hexdigest(), "sets": list(self._sets),
                  "set_tokens": self.set_tokens,
                  "set_documents": dict(zip(self._sets, np.bincount(set_ids, minlength=len(self._sets)).tolist(),
                                            strict=True)), **extra}
        tmp = self.directory / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, f"{base}.json")
        return record

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def read_shard_record(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Manifest:
    path: Path
    data: dict

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise DataMismatchError(f"{path} does not exist: run launch/prepare_data.py first (and its merge "
                                    "step if it ran as several parts)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise DataMismatchError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
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
