"""Artifacts on disk: atomic directories, fingerprints and provenance.

Every stage writes its output under a temporary sibling name and renames it into place only when
it is complete, so a directory that exists is complete and a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ArtifactExistsError(FileExistsError):
    """The output path exists and the caller did not ask to overwrite it."""


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing output, or one we could not write, before any expensive work starts."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactExistsError(
            f"output directory {path} already exists; choose another output_dir or set overwrite=true"
        )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise PermissionError(f"cannot write {path}: {ancestor} is not writable; pick another output_dir")


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block completes.

    On any exception the temporary directory is removed and an existing `path` is untouched.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries, i.e. renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write text to a temporary sibling file and rename it over `path`: readers see the old or the new file.
    `durable`: the file and the rename are on the disk when this returns (survives a node crash, not only
    a process crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def write_json_atomic(path: Path, obj: Any, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", durable)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def directory_fingerprint(path: Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.model")) -> str:
    """A hash over the named files of a directory (model weights, config, tokenizer files)."""
    path = Path(path)
    digest = hashlib.sha256()
    for pattern in patterns:
        for file in sorted(path.glob(pattern)):
            digest.update(file.name.encode())
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def library_versions(names: tuple[str, ...] = ("torch", "transformers", "tokenizers", "deepspeed",
                                               "datasets", "peft", "lm_eval", "numpy")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
