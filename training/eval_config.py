"""Typed configuration of the evaluation stage (see configs/eval/): torch-free, so `--help` is instant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import ConfigError
from data.precision import PRECISION_DOC, Precision
from training.config import ZeroShotSection

BosPolicy = Literal["once", "every", "none"]


@dataclass
class ModelEntry:
    name: str
    path: str


@dataclass
class PerplexitySet:
    name: str
    source: str
    subset: str | None = None
    split: str = "test"
    text_field: str = "text"


def paper_perplexity_sets() -> list[PerplexitySet]:
    """WikiText-2 test and PTB validation, the rows joined with blank lines, as the paper's code."""
    return [PerplexitySet("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "text"),
            PerplexitySet("ptb", "ptb_text_only", "penn_treebank", "validation", "sentence")]


@dataclass
class PerplexitySection:
    sets: list[PerplexitySet] = field(default_factory=paper_perplexity_sets)
    seq_lens: list[int] = field(default_factory=lambda: [128])
    bos: BosPolicy = "once"
    max_segments: int | None = None
    batch_size: int = 8

    __field_docs__ = {
        "sets": "texts: [{name, source (HF dataset name or local .parquet/.jsonl/.json/.txt), subset, split, "
                "text_field}]; [] skips perplexity",
        "seq_lens": "segment lengths: the paper's 128, and e.g. 2048 for the common long-window variant",
        "bos": "once: one BOS before the stream (LLaMA); every: BOS on each segment (Gemma needs it); none",
    }


@dataclass
class LatencySection:
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    input_tokens: int = 12
    new_tokens: int = 128
    warmup: int = 10
    runs: int = 20

    __field_docs__ = {"batch_sizes": "one measurement per batch size; [] skips latency"}


@dataclass
class EvalConfig:
    model: str | None = None
    models: list[ModelEntry] = field(default_factory=list)
    compare: list[Path] = field(default_factory=list)
    output_dir: Path = Path("outputs/eval")
    overwrite: bool = False
    device: str = "auto"
    dtype: Precision = "auto"
    trust_remote_code: bool = False
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    latency: LatencySection = field(default_factory=LatencySection)

    __field_docs__ = {
        "model": "one model to evaluate (HF checkpoint, hub name, embedded:smollm2-135m, or <run>/checkpoints/step_N)",
        "models": "several: [{name: original, path: ...}, {name: pruned, path: ...}]",
        "compare": "results.json files of earlier evaluations to show in the same table",
        "dtype": PRECISION_DOC + " (the official evaluation: fp16 on the GPU)",
        "trust_remote_code": "accept models that carry their own modeling code (module-pruned checkpoints) and run it",
    }

    def validate(self) -> None:
        if self.model is not None:
            self.models = [ModelEntry(Path(self.model).name or self.model, self.model), *self.models]
            self.model = None
        if not self.models and not self.compare:
            raise ConfigError("nothing to evaluate: set model=<checkpoint> (or models=[...], or compare=[...])")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")
        for path in self.compare:
            if not Path(path).is_file():
                raise ConfigError(f"compare: {path} does not exist (give results.json files of earlier evaluations)")
        if any(n < 2 for n in self.perplexity.seq_lens) or any(b < 1 for b in self.latency.batch_sizes):
            raise ConfigError("perplexity.seq_lens must be >= 2 and latency.batch_sizes >= 1")
