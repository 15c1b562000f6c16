"""Input corpora for tokenization: find the files, stream their records, apply the bad-input policy.

Inputs are a SlimPajama-627B root (`<root>/<split>/chunk*/example_*.jsonl.zst`), or any list of
files and globs of `.jsonl`, `.jsonl.zst` and `.txt`. Files are streamed line by line (zstd is
decompressed as a stream), so memory does not grow with file or corpus size.

Policy for bad records (never a silent loss): a malformed JSON line, a record without the text
field, invalid UTF-8 or an empty document is skipped, counted per reason and warned about with
file and line. A corrupt or truncated compressed stream fails that file with an error naming it.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
SKIP_REASONS = ("malformed_json", "missing_text", "invalid_utf8", "empty")
MAX_WARNINGS_PER_FILE = 5


class CorpusError(ValueError):
    """The inputs cannot be found or a file cannot be read."""


@dataclass
class Document:
    text: str
    source_set: str


def discover_inputs(inputs: list[str], split: str = "train") -> list[Path]:
    """Sorted input files: SlimPajama roots are expanded to `<root>/<split>/chunk*/*`, globs matched."""
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            layout = sorted(path.glob(f"{split}/chunk*/*.jsonl.zst")) or sorted(path.glob(f"{split}/chunk*/*.jsonl"))
            found = layout or sorted(p for p in path.rglob("*") if p.name.endswith(INPUT_SUFFIXES))
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if p.endswith(INPUT_SUFFIXES))
        elif path.is_file():
            found = [path]
        else:
            raise CorpusError(f"input {spec!r} does not exist; give files, globs or a SlimPajama root directory")
        if not found:
            raise CorpusError(f"input {spec!r} matches no {', '.join(INPUT_SUFFIXES)} files"
                              + (f" (looked for {split}/chunk*/*.jsonl.zst)" if path.is_dir() else ""))
        unsupported = [p for p in found if not p.name.endswith(INPUT_SUFFIXES)]
        if unsupported:
            raise CorpusError(f"unsupported input file {unsupported[0]}: use {', '.join(INPUT_SUFFIXES)}")
        files.extend(found)
    return sorted(dict.fromkeys(files))


def _zstd_chunks(raw, path: Path) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-frame) zstd file; a truncated last frame is an error."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    while block := raw.read(1 << 20):
        while block:
            yield frame.decompress(block)
            block = b""
            if frame.eof and frame.unused_data:
                block = frame.unused_data
                frame = decompressor.decompressobj()
    if not frame.eof:
        raise zstandard.ZstdError("the last frame ends early")


def iter_lines(path: Path) -> Iterator[bytes]:
    """Raw lines of a plain or zstd-compressed file, streamed; a damaged stream raises CorpusError."""
    with open(path, "rb") as raw:
        if not path.name.endswith(".zst"):
            yield from raw
            return
        pending = b""
        try:
            for chunk in _zstd_chunks(raw, path):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line + b"\n"
        except zstandard.ZstdError as err:
            raise CorpusError(f"{path}: corrupt or truncated zstd stream ({err}); re-download or remove "
                              "this file and run again (finished shards are kept)") from err
        if pending:
            yield pending


def _dig(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def file_set(path: Path, rules: dict[str, str]) -> str | None:
    """The source set the first matching rule ({file-name glob: set}) gives a file's records, or None."""
    return next((name for pattern, name in rules.items() if fnmatch.fnmatch(path.name, pattern)), None)


def read_documents(path: Path, skipped: Counter, text_field: str = "text",
                   set_field: str = "meta.redpajama_set_name", default_set: str | None = None) -> Iterator[Document]:
    """Stream the documents of one file, counting skipped records by reason in `skipped`. A record without
    `set_field` (and every line of a .txt file) belongs to `default_set`, else to "unknown" ("text")."""
    warned = 0

    def skip(reason: str, line_no: int) -> None:
        nonlocal warned
        skipped[reason] += 1
        if warned < MAX_WARNINGS_PER_FILE:
            log.warning("%s:%d: skipped record (%s)", path, line_no, reason)
            warned += 1

    is_text = path.name.endswith(".txt")
    missing_set = default_set or ("text" if is_text else "unknown")
    for line_no, raw in enumerate(iter_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skip("invalid_utf8", line_no)
            continue
        if is_text:
            if line.strip():
                yield Document(line.rstrip("\n"), missing_set)
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skip("malformed_json", line_no)
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            skip("missing_text", line_no)
            continue
        if not text.strip():
            skip("empty", line_no)
            continue
        source_set = _dig(record, set_field)
        yield Document(text, str(source_set) if source_set is not None else missing_set)
