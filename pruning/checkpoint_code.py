"""The modeling code a module-pruned checkpoint carries (`modeling_shortened.py`, named by `auto_map`).

The file is pruning/sublayers.py followed by a subclass of the original model class whose only change
is to skip, after building the model, the sub-layers `config.skipped_sublayers` names. A checkpoint
whose layers are all whole (only blocks removed, or module removals that emptied whole layers) stays a
plain one: no code, no auto_map, the stock class in `architectures`.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import PreTrainedModel

from pruning import sublayers

MODELING_FILE = "modeling_shortened.py"


def stock_class(model: PreTrainedModel) -> type:
    """The transformers class a (possibly module-pruned) model is, or subclasses."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model class: module-level pruning needs one")


def modeling_source(base: type) -> str:
    """The file's text: the skipping code, then `Shortened<Base>` built on the original class."""
    if getattr(transformers, base.__name__, None) is not base:
        raise TypeError(f"transformers does not export {base.__name__}: a module-pruned checkpoint of it could not "
                        "name its class; use unit=block")
    return Path(sublayers.__file__).read_text() + f'''

from transformers import {base.__name__}  # noqa: E402


class Shortened{base.__name__}({base.__name__}):
    """{base.__name__} without the attention/MLP sub-layers that config.skipped_sublayers names."""

    def __init__(self, config):
        super().__init__(config)
        skip_sublayers(self, config)
'''


def write_model_code(directory: Path, model: PreTrainedModel) -> bool:
    """After `save_pretrained`: give a checkpoint whose layers lost sub-layers its modeling file and auto_map,
    and leave one with whole layers plain. Returns whether code was written."""
    base = stock_class(model)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    auto_map = {k: v for k, v in (config.get("auto_map") or {}).items() if k != "AutoModelForCausalLM"}
    code = Path(directory) / MODELING_FILE
    skipped = any(getattr(model.config, "skipped_sublayers", None) or [])
    if skipped:
        code.write_text(modeling_source(base))
        auto_map["AutoModelForCausalLM"] = f"{MODELING_FILE[:-3]}.Shortened{base.__name__}"
        config["architectures"] = [f"Shortened{base.__name__}"]
    else:  # e.g. a module-pruned model whose half layers were all removed by block pruning since
        code.unlink(missing_ok=True)
        config["architectures"] = [base.__name__]
        for key in ("skipped_sublayers", "sublayer_modules"):
            config.pop(key, None)
    if auto_map:
        config["auto_map"] = auto_map
    else:
        config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return skipped
