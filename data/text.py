"""Read documents from a text source: a local .txt/.jsonl/.jsonl.zst/.json/.parquet file or a HF dataset.

Local formats follow what `datasets` does with the same files: a .txt file has one document per
line; .jsonl (optionally zstd-compressed), .json (a list of records, or JSON lines) and .parquet
(the hub's own format, e.g. wikitext's test-00000-of-00001.parquet) hold records whose `text_field`
is the document. Anything else is taken as a Hugging Face dataset name.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.corpus import iter_lines
from data.embedded import resolve_text

LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".json", ".parquet")


class TextSourceError(ValueError):
    """A text source is missing, unreadable or holds no usable documents."""


def _is_local(source: str) -> bool:
    """A text file; a directory or a name goes to `datasets.load_dataset` (hub or local dataset repo)."""
    return source.endswith(LOCAL_SUFFIXES) or Path(source).is_file()


def load_documents(source: str, text_field: str = "text", split: str = "train",
                   subset: str | None = None, keep_empty: bool = False) -> list[str]:
    """All documents of a source, in file order; empty ones only with `keep_empty` (wikitext's
    blank rows are part of the stream its perplexity is measured on)."""
    resolved = resolve_text(source)
    if _is_local(resolved):
        docs = _read_local(Path(resolved), text_field)
    else:
        docs = _read_hub(resolved, text_field, split, subset)
    if not any(d.strip() for d in docs):
        raise TextSourceError(f"text source {source!r} holds no non-empty documents")
    return docs if keep_empty else [d for d in docs if d.strip()]


def _read_local(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise TextSourceError(f"text file {path} does not exist; give an existing .txt/.jsonl/.json file "
                              "or a Hugging Face dataset name")
    name = path.name
    if name.endswith(".txt"):
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    if name.endswith(".json"):
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:  # JSON lines named .json, as `datasets` reads them (the official C4 subset)
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(records, list):
            raise TextSourceError(f"{path}: a .json text source must hold a list of records")
        return [_field(r, text_field, path, i + 1) for i, r in enumerate(records)]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise TextSourceError(f"{path}: no column {text_field!r}; columns: {table.column_names}")
        return [str(v) for v in table.column(text_field).to_pylist()]
    if name.endswith((".jsonl", ".jsonl.zst")):
        lines = (raw.decode("utf-8", errors="replace") for raw in iter_lines(path))
        return [_field(json.loads(line), text_field, path, i + 1) for i, line in enumerate(lines) if line.strip()]
    raise TextSourceError(f"{path}: unsupported text file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def _field(record: object, text_field: str, path: Path, line: int) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise TextSourceError(f"{path}:{line}: record has no {text_field!r} field; set text_field to the "
                              "field that holds the text")
    return str(record[text_field])


def _read_hub(name: str, text_field: str, split: str, subset: str | None) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # the hub, a missing dataset or a bad split all surface here
        raise TextSourceError(f"could not load text source {name!r} (split {split!r}) as a local file or "
                              f"a Hugging Face dataset: {err}") from err
    if text_field not in dataset.column_names:
        raise TextSourceError(f"dataset {name!r} has no column {text_field!r}; columns: {dataset.column_names}")
    return list(dataset[text_field])
