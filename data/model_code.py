"""Checkpoints that carry their own modeling code (an `auto_map` in config.json), such as module-pruned
ones (`unit=module`: pruning/sublayers.py).

transformers runs such code only with `trust_remote_code=True`; without it, a config whose
`model_type` it knows loads the stock class instead, silently missing the removed sub-layers. So
every stage that loads a model (prune, CPT, LoRA, eval, export, quantize) calls
`check_trust_remote_code` in its preflight, before anything expensive, and refuses such a checkpoint
unless its config says `trust_remote_code: true`. `copy_model_code` carries the code along wherever
a stage writes a config that must build the same model (a training run's export template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data.config import ConfigError


def _auto_map(model_path: str | Path) -> dict:
    config = Path(model_path) / "config.json"
    if not config.is_file():  # a hub name: transformers resolves it (and asks for trust_remote_code itself)
        return {}
    try:
        return json.loads(config.read_text()).get("auto_map") or {}
    except (OSError, json.JSONDecodeError):
        return {}  # the stage's own loading reports an unreadable config


def model_code_files(model_path: str | Path) -> list[str]:
    """The Python files a checkpoint's `auto_map` names (e.g. `modeling_shortened.py`); [] for a plain one."""
    refs = [ref for value in _auto_map(model_path).values() for ref in (value if isinstance(value, list) else [value])
            if ref]
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})


def check_trust_remote_code(model_path: str | Path, trust_remote_code: bool, key: str = "trust_remote_code") -> None:
    """Refuse a checkpoint with its own modeling code unless the config allows running it."""
    files = model_code_files(model_path)
    if files and not trust_remote_code:
        raise ConfigError(
            f"{model_path} carries its own modeling code ({', '.join(files)}, named by auto_map in its config.json; "
            "a module-pruned checkpoint's skips the removed attention/MLP sub-layers): transformers runs it only "
            f"when asked, and would otherwise load the stock class with those sub-layers missing. Read the file, "
            f"then set {key}=true")


def copy_model_code(source: str | Path, target: str | Path) -> None:
    """Copy the modeling files `source`'s auto_map names into `target` (nothing for a plain checkpoint)."""
    for name in model_code_files(source):
        shutil.copy2(Path(source) / name, Path(target) / name)
