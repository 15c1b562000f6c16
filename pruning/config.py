"""Typed configuration of the pruning stage (see configs/prune/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import ConfigError
from data.precision import PRECISION_DOC, Precision

CalibrationBos = Literal["special_tokens", "every"]  # the official get_examples, and its Gemma variant

Unit = Literal["block", "module"]  # whole blocks, or attention and MLP sub-layers (pruning/modules.py)

Criterion = Literal["ppl", "ppl+", "taylor", "taylor+", "mag", "mag+", "block_influence", "block_influence+"]
CRITERIA: tuple[str, ...] = Criterion.__args__


@dataclass
class CalibrationSection:
    """The paper's default: 10 random 128-token samples, seed 1234, from book text, drawn by the
    official sampler (pruning/calibration.py)."""

    source: str = "embedded:books.jsonl"
    text_field: str = "text"
    split: str = "train"
    subset: str | None = None
    num_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    batch_size: int = 10
    bos: CalibrationBos = "special_tokens"

    __field_docs__ = {
        "source": ".txt/.jsonl/.jsonl.zst/.json file, embedded:NAME, or a Hugging Face dataset name",
        "batch_size": "calibration samples per forward pass (Taylor: one backward per batch)",
        "bos": "special_tokens = rows tokenized with the tokenizer's special tokens (official LLaMA/Vicuna "
               "scripts); every = BOS put before each window (official Gemma scripts, --add_bos_to_every)",
    }

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("calibration.num_samples must be at least 1")
        if self.seq_len < 2:
            raise ConfigError("calibration.seq_len must be at least 2 tokens")
        if self.batch_size < 1:
            raise ConfigError("calibration.batch_size must be at least 1")


TARGETS = ("num_blocks", "param_ratio", "blocks", "num_modules", "modules")


@dataclass
class TargetSection:
    """How much to remove: one of param_ratio, num_blocks or blocks (unit=block), num_modules or modules
    (unit=module).

    With none set, the paper's headline setting applies: param_ratio=0.2 (20% fewer parameters).
    """

    num_blocks: int | None = None
    param_ratio: float | None = None
    blocks: list[int] | None = None
    num_modules: int | None = None
    modules: list[str] | None = None

    __exclusive__ = (TARGETS,)  # an override of one clears the recipe's other
    __field_docs__ = {
        "num_blocks": "number of blocks to remove",
        "param_ratio": "fraction of all parameters to remove: the most blocks that stay within it (a floor; the "
                       "paper's ratios are labels of block counts: use target.num_blocks to reproduce them); "
                       "unit=module: the longest run of the least important modules that stays within it",
        "blocks": "explicit block indices to remove (scores are still computed and reported)",
        "num_modules": "unit=module: number of attention/MLP sub-layers to remove",
        "modules": "unit=module: explicit sub-layers to remove, as LAYER.attn or LAYER.mlp, e.g. [3.attn, 5.mlp]",
    }

    def validate(self) -> None:
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if not given:
            self.param_ratio = 0.2
            given = ["param_ratio"]
        if len(given) != 1:
            raise ConfigError(f"set exactly one of {', '.join('target.' + k for k in TARGETS)} "
                              f"(got {', '.join(given) or 'none'}); clear the others, e.g. target.param_ratio=null")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("target.num_blocks must be at least 1")
        if self.num_modules is not None and self.num_modules < 1:
            raise ConfigError("target.num_modules must be at least 1")
        if self.modules is not None:
            bad = [m for m in self.modules if not re.fullmatch(r"\d+\.(attn|mlp)", m)]
            if bad or not self.modules:
                raise ConfigError(f"target.modules: {bad or 'empty'}; list sub-layers as LAYER.attn or LAYER.mlp, "
                                  "e.g. [3.attn, 5.mlp]")
        if self.param_ratio is not None and not 0 < self.param_ratio < 1:
            raise ConfigError("target.param_ratio must be between 0 and 1 (0.2 removes 20% of parameters)")
        if self.blocks is not None and not self.blocks:
            raise ConfigError("target.blocks is empty: list the block indices to remove")


@dataclass
class PruneConfig:
    model: str = "embedded:smollm2-135m"
    output_dir: Path = Path("outputs/pruned")
    overwrite: bool = False
    criterion: Criterion = "ppl"
    unit: Unit = "block"
    iterative: bool = False
    protect_first: int | None = None
    protect_last: int | None = None
    device: str = "auto"
    dtype: Precision = "auto"
    verify_reload: bool = True
    dry_run: bool = False
    trust_remote_code: bool = False
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    target: TargetSection = field(default_factory=TargetSection)

    __field_docs__ = {
        "model": "HF model directory or hub name, or embedded:smollm2-135m",
        "criterion": "ppl | taylor | mag | block_influence; a '+' keeps the first 4 and last 2 blocks "
                     "(the official code applies that protection to every criterion: see configs/prune/paper/)",
        "unit": "block: remove whole Transformer blocks (the paper's method); module: attention and MLP "
                "sub-layers are candidates on their own (the paper's Table 6); a layer that keeps one of them "
                "needs the modeling file written into the checkpoint (trust_remote_code)",
        "iterative": "ppl only: remove one block (or module) at a time and rescore (SLEB-style)",
        "protect_first": "blocks at the start never removed (default 4 for '+' criteria, else 0)",
        "protect_last": "blocks at the end never removed (default 2 for '+' criteria, else 0)",
        "device": "auto | cpu | cuda | cuda:N",
        "dtype": PRECISION_DOC + "; the official code scores PPL in fp16 on the GPU and Taylor in fp32",
        "verify_reload": "reload the written checkpoint and check every weight was loaded",
        "trust_remote_code": "accept a model that carries its own modeling code (auto_map), e.g. a module-pruned "
                             "checkpoint, and run that code",
        "dry_run": "load only the model's config (no weights) and print the plan: candidates, blocks to "
                   "remove, parameters before and after; writes nothing",
    }

    @property
    def base_criterion(self) -> str:
        return self.criterion.rstrip("+")

    @property
    def protected_counts(self) -> tuple[int, int]:
        plus = self.criterion.endswith("+")
        first = self.protect_first if self.protect_first is not None else (4 if plus else 0)
        last = self.protect_last if self.protect_last is not None else (2 if plus else 0)
        return first, last

    def validate(self) -> None:
        if self.iterative and self.base_criterion != "ppl":
            raise ConfigError(f"iterative=true works with the ppl criterion only, not {self.criterion!r}")
        first, last = self.protected_counts
        if first < 0 or last < 0:
            raise ConfigError("protect_first and protect_last must be 0 or more")
        target = self.target
        if self.unit == "block" and (target.num_modules is not None or target.modules is not None):
            raise ConfigError("target.num_modules and target.modules count attention/MLP sub-layers: set unit=module, "
                              "or target.num_blocks / target.blocks")
        if self.unit == "module":
            if target.num_blocks is not None or target.blocks is not None:
                raise ConfigError("unit=module removes sub-layers: set target.num_modules or target.modules (e.g. "
                                  "[3.attn, 3.mlp] for a whole layer) instead of target.num_blocks / target.blocks")
            if self.base_criterion == "block_influence":
                raise ConfigError("block_influence compares a whole block's input and output (ShortGPT) and has no "
                                  "sub-layer form: with unit=module use ppl, taylor or mag")
