"""Typed configuration of the training package's stages: CPT, LoRA and export (see configs/cpt/, configs/lora/).

Torch-free, so `--help` is instant. `CPTConfig` and `LoRAConfig` share `TrainingConfig` (batch
layout, ZeRO, optimizer, schedule, checkpoints, logging). The CPT defaults are the paper's recipe (Kim et al. 2024, appendix E): AdamW betas (0.9, 0.95),
weight decay 0.1, lr 1e-4, global batch 512 sequences of 2048 tokens, micro-batch 2, gradient
clipping 1.0. The paper states no learning-rate schedule; ours is linear warmup over 1% of the
steps, then cosine decay to 10% of the peak (`schedule.*`). The LoRA defaults are the paper's too (rank
8, alpha 16, dropout 0.05 on every projection, lr 1e-4, batch 64, 2 epochs, cutoff 256, 100
warm-up steps, 2,000 records held out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data.batch_layout import accumulation_steps
from data.config import ConfigError
from data.mixture import WEIGHT_TOLERANCE
from data.precision import PRECISION_DOC, Precision


def check_weights(key: str, weights: dict) -> None:
    """Weights per source set: numbers >= 0 that sum to 1 (within WEIGHT_TOLERANCE)."""
    bad = [name for name, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0]
    if bad:
        raise ConfigError(f"{key}: the weight of {bad[0]} must be a number >= 0, not {weights[bad[0]]!r}")
    total = sum(weights.values())
    if abs(total - 1) > WEIGHT_TOLERANCE:
        raise ConfigError(f"{key}: the weights sum to {total:.6g}, not 1: e.g. "
                          + "{" + ", ".join(f"{name}: {w / total:.4g}" for name, w in weights.items()) + "}"
                          if total > 0 else f"{key}: the weights sum to 0: give at least one set a weight")


@dataclass
class DynamicMixtureSection:
    """Sheared-LLaMA's dynamic batch loading (Xia et al. 2024, Algorithm 1; princeton-nlp/LLM-Shearing's
    DynamicLoadingCallback): every `update_every` steps, w <- normalise(w * exp(eta * gap)), gap = held-out
    loss - reference loss per set, then (1 - smoothing) w + smoothing / k. The defaults are the released
    code's (eta 1, smoothing 1e-4, gaps not clipped, every 400 steps of ~1M tokens); the paper's Algorithm 1
    clips the gap at 0 and does not smooth (`clip_gaps=true smoothing=0`)."""

    initial: str | dict[str, float] = "natural"
    update_every: int = 400
    reference: dict[str, float] = field(default_factory=dict)
    reference_model: str | None = None
    eta: float = 1.0
    smoothing: float = 1e-4
    clip_gaps: bool = False

    __field_docs__ = {
        "initial": "starting weights: natural (each set's share of the training tokens) or {set: weight}",
        "update_every": "steps between updates (LLM-Shearing's continued pretraining: eval_interval 400 batches "
                        "of 256 x 4096 tokens)",
        "reference": "{set: loss} to aim for (Sheared-LLaMA predicts it from scaling laws); empty = the unpruned "
                     "model's own held-out loss per set, measured once before training",
        "reference_model": "the model measured for the reference (default: the one pruning_report.json names)",
        "eta": "step size of the exponentiated-gradient update (LLM-Shearing: 1)",
        "smoothing": "share mixed in uniformly after each update, keeps every set alive (LLM-Shearing: 1e-4)",
        "clip_gaps": "gaps below 0 count as 0 (the paper's Algorithm 1: max(loss - reference, 0))",
    }

    def validate(self) -> None:
        if isinstance(self.initial, str) and self.initial != "natural":
            raise ConfigError("data.dynamic.initial must be natural or {set: weight, ...}")
        if isinstance(self.initial, dict):
            check_weights("data.dynamic.initial", self.initial)
        if self.update_every < 1 or self.eta <= 0 or not 0 <= self.smoothing < 1:
            raise ConfigError("data.dynamic.update_every must be >= 1, eta > 0 and smoothing in [0, 1)")
        bad = [name for name, loss in self.reference.items() if isinstance(loss, bool) or not isinstance(loss, (int, float))]
        if bad:
            raise ConfigError(f"data.dynamic.reference: the loss of {bad[0]} must be a number")


@dataclass
class DataSection:
    path: Path = Path("outputs/tokens")
    seq_len: int = 2048
    document_masking: bool = True
    num_workers: int = 1
    seed: int = 1234
    mixture: str | dict[str, float] = "natural"
    on_exhausted: Literal["wrap", "stop"] = "wrap"
    dynamic: DynamicMixtureSection = field(default_factory=DynamicMixtureSection)

    __field_docs__ = {
        "path": "tokenized data directory (holds manifest.json, from launch/prepare_data.py)",
        "document_masking": "attention and positions restart at each document inside a packed sequence",
        "num_workers": "DataLoader worker processes per rank",
        "seed": "seed of the sample order (a new permutation per epoch)",
        "mixture": "natural (one stream over every source set, as tokenized), {set: weight, ...} (shares of the "
                   "training tokens, summing to 1; unnamed sets get none) or dynamic (data.dynamic.*)",
        "on_exhausted": "a mixture's set that runs out: wrap (a new epoch of it, in a new order) or stop (the run "
                        "ends before the step that would need more, checkpointed and exported)",
    }

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("data.seq_len must be at least 2 tokens")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be 0 or more")
        if self.seed < 0:
            raise ConfigError("data.seed must be 0 or more")
        if isinstance(self.mixture, str) and self.mixture not in ("natural", "dynamic"):
            raise ConfigError(f"data.mixture: {self.mixture!r} is not natural, dynamic or a mapping "
                              "{set: weight, ...} (e.g. data.mixture={RedPajamaC4: 0.6, RedPajamaBook: 0.4})")
        if isinstance(self.mixture, dict):
            check_weights("data.mixture", self.mixture)


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_skipped_steps: int = 3

    __field_docs__ = {
        "weight_decay": "applied to matrices and embeddings; biases and norm gains (1-D tensors) are exempt",
        "grad_clip": "max global gradient norm (0 disables clipping)",
        "max_skipped_steps": "a non-finite loss or gradient norm skips the optimizer step; this many in a row "
                             "stop the run (exit code 3), keeping the last good checkpoint",
    }

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optimizer.lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optimizer.weight_decay and optimizer.grad_clip must be 0 or more")
        if self.max_skipped_steps < 1:
            raise ConfigError("optimizer.max_skipped_steps must be at least 1")


@dataclass
class ScheduleSection:
    warmup_fraction: float = 0.01
    warmup_steps: int | None = None
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    on_extend: Literal["continue", "rewarm"] | None = None

    __field_docs__ = {
        "warmup_fraction": "linear warmup over this share of the steps (ignored when warmup_steps is set)",
        "warmup_steps": "linear warmup over exactly this many steps",
        "decay": "after warmup: cosine or linear decay to min_lr_ratio x lr, or constant",
        "min_lr_ratio": "final lr as a fraction of the peak lr",
        "on_extend": "resuming with another train_steps/train_tokens: continue = decay from the current lr to the "
                     "floor at the new end, no warmup; rewarm = warm up to the peak again (warmup_steps or "
                     "warmup_fraction of the remaining steps), then decay; unset: such a resume is refused",
    }

    def validate(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("schedule.warmup_fraction must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps must be 0 or more")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule.min_lr_ratio must be in [0, 1]")


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    every_minutes: float = 60.0
    keep_last: int = 2
    permanent_every: int = 5000
    export_at_end: bool = True
    keep_best: str | None = None

    __field_docs__ = {
        "every_steps": "save a committed checkpoint every this many steps (0: only on time, stop and end)",
        "every_minutes": "also save when this much wall time passed since the last save (0: off)",
        "keep_last": "committed checkpoints kept besides the permanent ones",
        "permanent_every": "checkpoints at multiples of this step are never deleted (0: none)",
        "export_at_end": "write a Hugging Face checkpoint to exports/step_N when training completes",
        "keep_best": "a metric (e.g. val.loss): the checkpoint with its lowest recorded value is never deleted",
    }

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.permanent_every < 0:
            raise ConfigError("checkpoint.every_steps, every_minutes and permanent_every must be 0 or more")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be at least 1 (the one to resume from)")


@dataclass
class DistributedSection:
    timeout_minutes: float = 30.0

    __field_docs__ = {"timeout_minutes": "how long a collective waits for the other ranks before the run fails "
                                         "(torch's own default for NCCL: 10)"}

    def validate(self) -> None:
        if self.timeout_minutes <= 0:
            raise ConfigError("distributed.timeout_minutes must be positive")


@dataclass
class WatchdogSection:
    slow_factor: float = 10.0
    min_seconds: float = 60.0
    window: int = 50

    __field_docs__ = {
        "slow_factor": "a step this many times the median of the recent ones dumps every rank's Python stacks "
                       "into <output_dir>/watchdog/ and names the late rank (0: off)",
        "min_seconds": "never before a step has run this long",
        "window": "recent steps the median is taken over",
    }

    def validate(self) -> None:
        if self.slow_factor < 0 or self.min_seconds < 0 or self.window < 3:
            raise ConfigError("watchdog.slow_factor and watchdog.min_seconds must be 0 or more, watchdog.window 3 "
                              "or more")


@dataclass
class WandbSection:
    """Weights & Biases (`logging.trackers: [wandb]`, the `shorten[wandb]` extra)."""

    project: str = "shorten"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline"] | None = None

    __field_docs__ = {
        "entity": "W&B team or user (default: the logged-in user's default entity)",
        "name": "the run's display name (default: the run directory's name)",
        "mode": "offline: write under <output_dir>/wandb/ only, upload later with `wandb sync <output_dir>/wandb` "
                "(compute nodes without internet); null: WANDB_MODE, else online",
    }


@dataclass
class MlflowSection:
    """MLflow (`logging.trackers: [mlflow]`, the `shorten[mlflow]` extra)."""

    tracking_uri: str | None = None
    experiment: str = "shorten"
    run_name: str | None = None

    __field_docs__ = {
        "tracking_uri": "null: MLFLOW_TRACKING_URI, else a local store in the run directory "
                        "(sqlite:///<output_dir>/mlflow.db, artifacts in <output_dir>/mlflow-artifacts)",
        "run_name": "the run's name (default: the run directory's name)",
    }


@dataclass
class LoggingSection:
    every_steps: int = 1
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbSection = field(default_factory=WandbSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    peak_tflops: float | None = None

    __field_docs__ = {
        "every_steps": "progress line on rank 0 every this many steps (metrics.jsonl gets every step)",
        "trackers": "where rank 0 also sends every metric of metrics.jsonl, at the same steps: any of "
                    "tensorboard, wandb, mlflow; [] for metrics.jsonl only",
        "peak_tflops": "accelerator peak TFLOP/s per device for MFU; default: known GPUs by name, none on CPU",
    }

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ConfigError("logging.every_steps must be at least 1")
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"logging.trackers lists a tracker twice: {self.trackers}")


@dataclass
class ProfileSection:
    """torch.profiler over a window of steps, and a CUDA memory snapshot when a step runs out of memory."""

    steps: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=lambda: [0])
    memory: bool = False
    oom_snapshot: bool = False

    __field_docs__ = {
        "steps": "[first, last]: profile these optimizer steps (inclusive) into <output_dir>/profile/ as Chrome "
                 "traces (TensorBoard's profiler, Perfetto); [] = off, nothing is created",
        "ranks": "the ranks that profile (each writes its own trace)",
        "memory": "also record allocations with shapes and stacks (TensorBoard's Memory View); on a GPU also the "
                  "window's CUDA memory snapshot (pytorch.org/memory_viz)",
        "oom_snapshot": "GPU: record CUDA allocation history and dump it to <output_dir>/profile/ when a step runs "
                        "out of memory (open it at pytorch.org/memory_viz)",
    }

    def validate(self) -> None:
        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise ConfigError(f"profile.steps must be [first, last] with 1 <= first <= last (got {self.steps}), "
                              "e.g. profile.steps=[10,12], or [] for no profiling")
        if self.steps and (not self.ranks or min(self.ranks) < 0):
            raise ConfigError("profile.ranks must list at least one rank (0 or more), e.g. profile.ranks=[0]")


@dataclass
class ValidationSection:
    every_steps: int = 500
    sequences: int = 64
    set_sequences: int | None = None

    __field_docs__ = {
        "every_steps": "held-out loss on the data's validation split every this many steps (0: off)",
        "sequences": "validation sequences, the first ones of the split, shared across ranks",
        "set_sequences": "CPT: also val.loss.<set> on the first this many held-out sequences of each source set "
                         "(null: as many as sequences; 0: off); the dynamic mixture's updates use them too",
    }

    def validate(self) -> None:
        if self.every_steps < 0 or self.sequences < 0 or (self.set_sequences or 0) < 0:
            raise ConfigError("validation.every_steps, validation.sequences and validation.set_sequences must be 0 "
                              "or more")

    def per_set(self) -> int:
        return self.sequences if self.set_sequences is None else self.set_sequences


PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass
class ZeroShotSection:
    """lm-eval zero-shot tasks, as the evaluation stage runs them."""

    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    include_path: str | None = None
    batch_size: int = 8
    limit: int | None = None
    add_bos_token: bool | None = None

    __field_docs__ = {
        "tasks": "lm-eval task names; [] skips zero-shot (default: the paper's seven)",
        "add_bos_token": "BOS before each request: null = the tokenizer's default (lm-eval 0.4; LLaMA adds it), "
                         "false = none (how the official 2023 harness scored LLaMA), true = always",
        "include_path": "directory of extra lm-eval task YAMLs (local data); embedded:tasks has wiki_cloze",
        "limit": "evaluate only the first N items of each task (quick checks, noisier; not comparable to papers)",
    }


@dataclass
class PeriodicZeroShotSection(ZeroShotSection):
    """The same tasks scored on the model in training, every `every_steps` steps."""

    every_steps: int = 0

    __field_docs__ = {
        **ZeroShotSection.__field_docs__,
        "every_steps": "lm-eval zero-shot accuracy of the model in training every this many steps (0: off)",
    }

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError("zeroshot.every_steps must be 0 or more")
        if self.every_steps and not self.tasks:
            raise ConfigError("zeroshot.tasks is empty: list lm-eval tasks or set zeroshot.every_steps=0")


@dataclass
class DistillSection:
    """Logit distillation from a teacher during CPT (Minitron's defaults: forward KL, T=1, alpha 0)."""

    teacher: str | None = None
    alpha: float = 0.0
    temperature: float = 1.0
    chunk: int = 8192
    top_k: int | None = None

    __field_docs__ = {
        "teacher": "HF checkpoint of the teacher, typically the unpruned model (pruning_report.json's model); "
                   "null: plain next-token CPT",
        "alpha": "loss = alpha x CE + (1 - alpha) x T^2 x KL(teacher || student); 0 = logits only (Minitron)",
        "temperature": "softmax temperature T of both models' logits in the KL",
        "chunk": "vocabulary entries per chunk of the KL: fp32 logits are held for [tokens, chunk] at a time",
        "top_k": "distil from the teacher's k largest logits only, both distributions renormalised over those k "
                 "(NVIDIA Model-Optimizer's TopKLogitsKLLoss): [tokens, k] of the teacher kept instead of "
                 "[tokens, vocab]; null: the full vocabulary",
    }

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError("distill.alpha must be in [0, 1] (1 = plain CE, 0 = KL only)")
        if self.temperature <= 0 or self.chunk < 1:
            raise ConfigError("distill.temperature must be positive and distill.chunk at least 1")
        if self.top_k is not None and self.top_k < 2:
            raise ConfigError("distill.top_k must be at least 2 (a KL over one entry is always 0), or null for the "
                              "full vocabulary")


@dataclass
class ZeroSection:
    """DeepSpeed ZeRO's communication settings (`zero_stage` picks the stage). ZeRO-1 reduces gradients once
    per optimizer step; ZeRO-2/3 reduce (scatter) them at every micro-step, which `overlap_comm` hides
    behind the backward pass. Gradients accumulate and are reduced in fp32 by default: DeepSpeed's bf16
    default loses precision over many accumulation steps (32 per step on one node of 8 GPUs)."""

    overlap_comm: bool | None = None
    bucket_size: int = 200_000_000
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"

    __field_docs__ = {
        "overlap_comm": "overlap gradient reduction with the backward pass (default: on for ZeRO-2/3, off for ZeRO-1)",
        "bucket_size": "elements per reduce and all-gather bucket (overlap_comm holds ~4.5 buckets)",
        "grad_accum_dtype": "dtype gradients accumulate in over micro-batches (bf16/fp16 training)",
        "reduce_dtype": "dtype gradients are all-reduced / reduce-scattered in (bf16/fp16 training)",
    }

    def validate(self) -> None:
        if self.bucket_size < 1:
            raise ConfigError("zero.bucket_size must be a positive number of elements, e.g. 2e8")


@dataclass
class TrainingConfig:
    """What every DeepSpeed training stage (CPT, LoRA) shares: model, batch layout, ZeRO, optimizer,
    schedule, checkpoints, logging. The stages add their data and length."""

    model: str = "outputs/pruned"
    output_dir: Path = Path("outputs/cpt")
    train_steps: int | None = None
    global_batch: int = 512
    micro_batch: int = 2
    zero_stage: Literal[1, 2, 3] = 2
    zero: ZeroSection = field(default_factory=ZeroSection)
    precision: Precision = "auto"
    activation_checkpointing: bool | int = False
    attn_implementation: str = "auto"
    kernels: Literal["none", "liger"] = "none"
    compile: bool = False
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    resume: bool = True
    seed: int = 1234
    memory_check: bool = True
    trust_remote_code: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)

    __field_docs__ = {
        "seed": "seeds new weights (LoRA adapters) and dropout; each rank's stream is seed + rank",
        "model": "Hugging Face checkpoint to train (path, hub name or embedded:smollm2-135m)",
        "output_dir": "run directory: checkpoints/, tensorboard/, metrics.jsonl, exports/; rerun to resume",
        "train_steps": "optimizer steps to train",
        "global_batch": "sequences per optimizer step = micro_batch x accumulation x data-parallel size",
        "micro_batch": "sequences per rank per forward/backward",
        "zero_stage": "DeepSpeed ZeRO stage: 1, 2 or 3",
        "precision": PRECISION_DOC,
        "activation_checkpointing": "recompute blocks' activations in backward: true (every block), false, or N: "
                                    "every N-th block (selective; 2 = half of them)",
        "attn_implementation": "auto (varlen on GPU, sdpa on CPU), varlen (PyTorch's flash varlen kernel), "
                               "flex_attention, flash_attention_2/3 (flash-attn package), sdpa or eager; "
                               "others are refused: they cannot be handed document boundaries",
        "kernels": "liger: Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; GPU, "
                   "the liger-kernel package)",
        "compile": "torch.compile each decoder block",
        "resume": "resume from the latest committed checkpoint in output_dir; false refuses to reuse it",
        "memory_check": "CPT on a GPU: refuse a run whose per-GPU memory estimate (training/memory.py) exceeds the "
                        "device's memory; false launches it anyway",
        "deepspeed": "extra DeepSpeed config merged over ours (e.g. {zero_optimization: {round_robin_gradients: true}})",
        "trust_remote_code": "accept a model that carries its own modeling code (auto_map in config.json), e.g. a "
                             "module-pruned checkpoint (launch/prune.py unit=module), and run that code",
    }

    def validate(self) -> None:
        if self.train_steps is not None and self.train_steps < 1:
            raise ConfigError("train_steps must be positive")
        accumulation_steps(self.global_batch, self.micro_batch)  # the world size is checked at launch
        if self.activation_checkpointing < 0:
            raise ConfigError("activation_checkpointing must be true, false or N >= 1 (every N-th block)")


@dataclass
class CPTConfig(TrainingConfig):
    data: DataSection = field(default_factory=DataSection)
    train_tokens: int | None = None
    validation: ValidationSection = field(default_factory=ValidationSection)
    zeroshot: PeriodicZeroShotSection = field(default_factory=PeriodicZeroShotSection)
    distill: DistillSection = field(default_factory=DistillSection)
    init: Literal["pretrained", "random"] = "pretrained"

    __exclusive__ = (("train_steps", "train_tokens"),)  # an override of one clears the recipe's other
    __field_docs__ = {
        **TrainingConfig.__field_docs__,
        "model": "pruned Hugging Face checkpoint (path, hub name or embedded:smollm2-135m)",
        "train_steps": "optimizer steps to train (set this or train_tokens)",
        "train_tokens": "tokens to train on; steps = ceil(tokens / (global_batch x seq_len))",
        "init": "pretrained: start from the model's weights (the pruned network); random: the same architecture "
                "re-initialised by the model's own _init_weights with `seed` (the paper's Figure 5 baseline, CPT from "
                "scratch)",
    }

    def validate(self) -> None:
        super().validate()
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ConfigError("set exactly one of train_steps or train_tokens (e.g. train_tokens=37e9 as the "
                              "paper's 20%-pruned model, or train_steps=100)")
        if (self.train_tokens or 1) < 1:
            raise ConfigError("train_tokens must be positive")

    def total_steps(self) -> int:
        if self.train_steps is not None:
            return self.train_steps
        tokens_per_step = self.global_batch * self.data.seq_len
        return -(-int(self.train_tokens) // tokens_per_step)


PAPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AlpacaSection:
    source: str = "yahma/alpaca-cleaned"
    split: str = "train"
    val_size: int = 2000
    seed: int = 42
    cutoff_len: int = 256
    train_on_inputs: bool = False

    __field_docs__ = {
        "source": "Alpaca records: a local .json/.jsonl file, embedded:alpaca_en_demo.json, or a HF dataset name",
        "val_size": "rows held out for the validation loss, as the official run: datasets' train_test_split"
                    "(test_size=val_size, shuffle=True, seed=seed); the paper's 2,000",
        "seed": "seed of that split (official: 42) and of the training order",
        "cutoff_len": "prompt + response tokens kept per example",
        "train_on_inputs": "also train on the prompt tokens (default: loss on the response only)",
    }

    def validate(self) -> None:
        if self.val_size < 1 or self.cutoff_len < 8:
            raise ConfigError("data.val_size must be at least 1 and data.cutoff_len at least 8")


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_LORA_TARGETS))

    __field_docs__ = {"target_modules": "module names to adapt (default: every projection, as the paper)"}

    def validate(self) -> None:
        if self.r < 1 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ConfigError("lora.r must be >= 1, lora.dropout in [0, 1), lora.target_modules non-empty")


def lora_optimizer() -> OptimizerSection:
    """AdamW as the paper's LoRA runs (Hugging Face Trainer defaults): betas (0.9, 0.999), no decay."""
    return OptimizerSection(lr=1e-4, betas=[0.9, 0.999], weight_decay=0.0)


def lora_schedule() -> ScheduleSection:
    """The paper's LoRA runs (LLM-Pruner's recipe): 100 warm-up steps, then linear decay to zero."""
    return ScheduleSection(warmup_steps=100, decay="linear", min_lr_ratio=0.0)


@dataclass
class LoRAConfig(TrainingConfig):
    output_dir: Path = Path("outputs/lora")
    data: AlpacaSection = field(default_factory=AlpacaSection)
    lora: LoraSection = field(default_factory=LoraSection)
    epochs: float = 2.0
    global_batch: int = 64
    micro_batch: int = 4
    optimizer: OptimizerSection = field(default_factory=lora_optimizer)
    schedule: ScheduleSection = field(default_factory=lora_schedule)
    validation: ValidationSection = field(default_factory=lambda: ValidationSection(every_steps=100, sequences=2000))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every_steps=200,
                                                                                   keep_best="val.loss"))
    export: Literal["best", "last"] = "best"

    __field_docs__ = {
        **TrainingConfig.__field_docs__,
        "export": "best = adapters of the committed checkpoint with the lowest val.loss (the official run's "
                  "load_best_model_at_end); last = the final step's",
        "model": "checkpoint to adapt: a pruned model, a CPT export (path, hub name, embedded:smollm2-135m)",
        "output_dir": "run directory: checkpoints/, metrics.jsonl, tensorboard/, adapter/, merged/",
        "train_steps": "optimizer steps (default: epochs over the training records)",
        "epochs": "passes over the training records (the paper: 2)",
        "global_batch": "examples per optimizer step (the paper: 64)",
    }

    def validate(self) -> None:
        super().validate()
        if self.epochs <= 0:
            raise ConfigError("epochs must be positive")
        if self.export == "best" and not (self.validation.every_steps and self.checkpoint.keep_best):
            raise ConfigError("export=best needs validation.every_steps > 0 and checkpoint.keep_best=val.loss "
                              "(or set export=last)")
        if self.zero_stage == 3:
            raise ConfigError("LoRA runs with zero_stage 1 or 2: the adapters are small, and merging them needs "
                              "the whole base weights on one rank")


@dataclass
class ExportConfig:
    checkpoint: Path = Path("outputs/cpt/checkpoints/step_00001000")
    output_dir: Path = Path("outputs/cpt-export")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    overwrite: bool = False
    trust_remote_code: bool = False

    __field_docs__ = {"checkpoint": "a committed checkpoint directory of a CPT or LoRA run, <run>/checkpoints/step_N",
                      "dtype": "weights dtype of the export (training keeps fp32 master weights)",
                      "trust_remote_code": "the run's model carries its own modeling code (a module-pruned checkpoint): "
                                           "run it to build the export"}
