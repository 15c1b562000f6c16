"""Typed configuration of the evaluation stage (see configs/eval/): torch-free, so `--help` is instant."""

from __future__ import annotations

import os
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


OFFICIAL_PROMPT = "The Leaning Tower of Pisa is known for"  # the official gen_batch_eval_time.py's


@dataclass
class SamplingSection:
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    seed: int = 1234

    __field_docs__ = {"do_sample": "false: greedy; true: top-k/top-p sampling (the official scripts' 50/0.95/1.0)",
                      "seed": "torch.manual_seed before each measurement or prompt"}

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "top_k": self.top_k, "top_p": self.top_p, "temperature": self.temperature}


@dataclass
class LatencySection:
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    input_tokens: int | None = 12
    prompt: str = OFFICIAL_PROMPT
    warmup: int = 10
    runs: int = 20
    sampling: SamplingSection = field(default_factory=lambda: SamplingSection(do_sample=True))
    memory_limit_gb: float | None = None
    max_batch: bool = False
    max_batch_cap: int = 1024

    __field_docs__ = {
        "batch_sizes": "the batch sizes M of the grid; [] skips latency",
        "new_tokens": "the output lengths L of the grid (forced: exactly L new tokens)",
        "input_tokens": "the prompt's ids (special tokens included) repeated or cut to this many; null: the "
                        "prompt as tokenized (the official script's way)",
        "sampling": "how tokens are chosen; default as the official script (top-k 50, top-p 0.95, seed 1234)",
        "memory_limit_gb": "a cell over it counts as out of memory: on a GPU the allocator is capped (a smaller "
                           "card), on a CPU a lower-bound estimate or the measured peak RSS over it",
        "max_batch": "search the largest batch that fits per L (needs memory_limit_gb on a CPU)",
        "max_batch_cap": "the search stops here",
    }

    def validate(self) -> None:
        if any(n < 1 for n in self.new_tokens) or (self.input_tokens is not None and self.input_tokens < 1):
            raise ConfigError("latency.new_tokens and latency.input_tokens must be >= 1")
        if self.warmup < 0 or self.runs < 1 or self.max_batch_cap < 1:
            raise ConfigError("latency.warmup must be >= 0, latency.runs and latency.max_batch_cap >= 1")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise ConfigError(f"latency.memory_limit_gb must be > 0, got {self.memory_limit_gb}")
        if self.max_batch and not (self.batch_sizes and self.new_tokens):
            raise ConfigError("latency.max_batch=true searches per output length: set latency.batch_sizes and "
                              "latency.new_tokens too")

    def check_device(self, device: str) -> None:
        """What a CPU cannot do (checked again once `device=auto` is resolved, before any model loads)."""
        if device != "cpu":
            return
        if self.max_batch and self.memory_limit_gb is None:
            raise ConfigError("latency.max_batch=true on a CPU needs latency.memory_limit_gb: a CPU out of memory "
                              "is the kernel killing the process, not an error the search can record")
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
        if self.memory_limit_gb and physical and self.memory_limit_gb > physical:
            raise ConfigError(f"latency.memory_limit_gb={self.memory_limit_gb} is more than this machine's "
                              f"{physical:.1f} GiB: a cell over the machine's memory is killed, not recorded")


@dataclass
class SamplesSection:
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    sampling: SamplingSection = field(default_factory=SamplingSection)

    __field_docs__ = {"prompts": "each model's continuation of each, side by side in results.md; [] skips",
                      "sampling": "greedy by default; do_sample=true samples as the official demo"}


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
    samples: SamplesSection = field(default_factory=SamplesSection)

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
        self.latency.check_device(self.device)
        if self.samples.max_new_tokens < 1:
            raise ConfigError(f"samples.max_new_tokens must be >= 1, got {self.samples.max_new_tokens}")
