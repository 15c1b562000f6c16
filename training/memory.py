"""Per-GPU memory of a training run, from the model's shape and the run's settings: one function that the
preflight (`training/cpt.check_memory`), the recipes' headers (launch/memory.py), the README table and
bench_gpu.py all use.

  ModelShape.from_config(config)           parameter counts (the model built on the meta device) and block sizes
  estimate_memory(shape, setup)            a MemoryEstimate: bytes per part, and the total
  block_activation_bytes(shape, ...)       what autograd keeps per token and block, per attention path

With P parameters, N data-parallel ranks and e bytes per element of the training precision:
  weights      e P; ZeRO-3: e P / N plus two blocks gathered at a time
  gradients    ZeRO-1: the whole fp32 gradient, 4 P (under bf16 each bf16 gradient is added to DeepSpeed's fp32
               buffer and freed at once, `immediate_grad_update`: one block's worth in flight; fp16 has no such
               option and holds e P at the end of backward); ZeRO-2/3: 4 P / N plus the reduce buckets
  optimizer    fp32 master weights and AdamW's two moments, 12 P / N (ZeRO keeps an fp32 copy at any precision)
  activations  micro_batch x seq_len x (blocks kept x `block_activation_bytes` + recomputed blocks x their input,
               e h, + one block rematerialised in backward) + the final norm and the document mask
  logits       the loss: transformers' cross-entropy keeps the fp32 log-softmax and, in backward, its gradient
               and the input's: 12 V per token; Liger's fused loss keeps no logits (its lm_head gradient, 4 V h,
               instead); distillation keeps both models' logits and the student's gradient (3 e V) plus fp32
               vocabulary chunks, and the cross-entropy only when alpha > 0
  teacher      distillation: the teacher's weights, e P_teacher (ZeRO-3: / N)
  reserve      3 GiB for the CUDA context, NCCL's buffers and allocator fragmentation (assumed, not measured)

The per-block bytes are what the kernels keep for backward, measured with saved-tensor hooks on a tiny Llama
for every path the CPU runs (tests/test_memory.py) and on the GPU for the others (tests/test_gpu.py);
bench_gpu.py prints the estimate next to `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GIB = 2**30
RESERVE = 3 * GIB
FP32 = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# What the recipes are written for: the devices' memory as the lent machines report it (nvidia-smi), and the
# share of it a recommended setting may use (the rest absorbs what the model leaves out).
GPUS = {"H100 80 GB": 81559 * 2**20, "H200 141 GB": 143771 * 2**20}
RECOMMENDED_FRACTION = 0.85


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs: parameter counts and one block's dimensions (LLaMA-style blocks)."""

    parameters: int
    block_parameters: int
    blocks: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config, trust_remote_code: bool = False) -> ModelShape:
        """Counted on the meta device: exact for any architecture transformers builds, nothing allocated
        (a module-pruned checkpoint's own code, which builds only the kept sub-layers, with trust_remote_code)."""
        import torch
        from transformers import AutoModelForCausalLM

        from pruning.layers import find_decoder_layers

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        blocks = find_decoder_layers(model)[1]
        heads = config.num_attention_heads
        return cls(parameters=sum(p.numel() for p in model.parameters()),
                   block_parameters=max(sum(p.numel() for p in block.parameters()) for block in blocks),
                   blocks=len(blocks), hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size)


@dataclass(frozen=True)
class Setup:
    """The settings of a run that its memory depends on (one GPU's view)."""

    zero_stage: int = 1
    world_size: int = 8
    micro_batch: int = 2
    seq_len: int = 2048
    checkpointing: bool | int = False
    precision: str = "bf16"
    attention: str = "varlen"
    kernels: str = "none"
    bucket_size: int = 200_000_000
    overlap_comm: bool | None = None
    teacher: ModelShape | None = None
    distill_alpha: float = 0.0
    distill_chunk: int = 8192


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        shown = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value)
        return f"{self.gib():.1f} GiB ({shown})"


def saves_float_mask(attention: str) -> bool:
    """sdpa turns the boolean document mask into a float mask in every layer, and its kernel keeps it."""
    return attention == "sdpa"


def block_activation_bytes(shape: ModelShape, attention: str, dtype_bytes: int, seq_len: int) -> int:
    """Bytes autograd keeps per token for one decoder block (no dropout), by the ops that keep them:
      each RMSNorm: the fp32 input (the input itself in fp32), 1/rms (fp32), the normalised input and the
        normed output (kept by the projections that read it): 4 h + 4 + 2 e h
      attention kernel: query, key and value (grouped key/value heads repeated to every query head where
        transformers calls `repeat_kv`: sdpa and eager with a mask), its output (the o_proj input is a view of
        it for the flash-style and sdpa kernels) and the fp32 log-sum-exp per head;
        sdpa: the float document mask, e S; flex: the output's copy for o_proj;
        eager: the fp32 softmax and the probabilities in e, (4 + e) heads S (4 heads S in fp32), the output's copy
        for o_proj
      MLP: gate (SiLU's input), SiLU's output, up and their product (down_proj's input): 4 e i
    """
    e, h, q_width = dtype_bytes, shape.hidden, shape.heads * shape.head_dim
    kv_width = q_width if attention in ("sdpa", "eager") else shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4 + 2 * e * h)
    mlp = 4 * e * shape.intermediate
    qkv = e * (q_width + 2 * kv_width)
    if attention == "eager":  # fp32 softmax, then the probabilities cast to e (the same tensor in fp32)
        probabilities = (FP32 + (e if e != FP32 else 0)) * shape.heads * seq_len
        return norms + qkv + probabilities + e * q_width + mlp
    kernel = qkv + e * q_width + FP32 * shape.heads
    if saves_float_mask(attention):
        kernel += e * seq_len
    if attention == "flex_attention":
        kernel += e * q_width
    return norms + kernel + mlp


def checkpointed_blocks(blocks: int, checkpointing: bool | int) -> int:
    """Blocks recomputed in backward: all, none, or every N-th (blocks 0, N, 2N, ...)."""
    if checkpointing is True:
        return blocks
    if not checkpointing:
        return 0
    return math.ceil(blocks / int(checkpointing))


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    e = DTYPE_BYTES[setup.precision]
    per_block = block_activation_bytes(shape, setup.attention, e, setup.seq_len)
    recomputed = checkpointed_blocks(shape.blocks, setup.checkpointing)
    per_token = (shape.blocks - recomputed) * per_block + recomputed * e * shape.hidden
    per_token += per_block if recomputed else 0  # the block being rematerialised in backward
    per_token += 4 * shape.hidden + 4 + 2 * e * shape.hidden  # the final norm
    if setup.attention in ("sdpa", "eager"):
        per_token += setup.seq_len  # the boolean document mask transformers builds once per forward
    return per_token * setup.micro_batch * setup.seq_len


def logits_bytes(shape: ModelShape, setup: Setup) -> float:
    tokens = setup.micro_batch * setup.seq_len
    cross_entropy = 12 * shape.vocab * tokens
    if setup.teacher is not None:
        e = DTYPE_BYTES[setup.precision]
        chunks = 4 * FP32 * min(setup.distill_chunk, shape.vocab) * tokens
        return 3 * e * shape.vocab * tokens + chunks + (cross_entropy if setup.distill_alpha > 0 else 0)
    if setup.kernels == "liger":
        return FP32 * shape.vocab * shape.hidden
    return cross_entropy


def estimate_memory(shape: ModelShape, setup: Setup) -> MemoryEstimate:
    """Per-GPU peak memory of a training run (see the module docstring for each part)."""
    e, n, p = DTYPE_BYTES[setup.precision], setup.world_size, shape.parameters
    weights = e * p / n + 2 * e * shape.block_parameters if setup.zero_stage == 3 else e * p
    if setup.zero_stage == 1:
        in_flight = {"bf16": e * shape.block_parameters, "fp16": e * p, "fp32": 0}[setup.precision]
        gradients = FP32 * p + in_flight
    else:
        overlap = setup.overlap_comm if setup.overlap_comm is not None else True
        buckets = setup.bucket_size * (e * (2 if overlap else 1) + FP32)
        gradients = FP32 * p / n + buckets
    teacher = 0.0
    if setup.teacher is not None:
        t = setup.teacher
        teacher = e * t.parameters / n + 2 * e * t.block_parameters if setup.zero_stage == 3 else e * t.parameters
    return MemoryEstimate({"weights": weights, "gradients": gradients, "optimizer": 12 * p / n,
                           "activations": activation_bytes(shape, setup), "logits": logits_bytes(shape, setup),
                           "teacher": teacher, "reserve": RESERVE})


def remedies(shape: ModelShape, setup: Setup, limit: float) -> list[tuple[str, MemoryEstimate]]:
    """Single setting changes that bring the estimate under `limit` bytes, cheapest in speed first."""
    tries = []
    if setup.micro_batch > 1:
        tries.append((f"micro_batch={setup.micro_batch // 2}", replace(setup, micro_batch=setup.micro_batch // 2)))
    if setup.checkpointing is not True:
        if not setup.checkpointing:
            tries.append(("activation_checkpointing=2", replace(setup, checkpointing=2)))
        tries.append(("activation_checkpointing=true", replace(setup, checkpointing=True)))
    if setup.zero_stage < 3:
        tries.append((f"zero_stage={setup.zero_stage + 1}", replace(setup, zero_stage=setup.zero_stage + 1)))
    found = [(change, estimate_memory(shape, changed)) for change, changed in tries]
    return [(change, estimate) for change, estimate in found if estimate.total <= limit]


def refusal(shape: ModelShape, setup: Setup, device_name: str, device_bytes: int) -> str | None:
    """None when the estimate fits the device, else the message that names the estimate and what to change."""
    estimate = estimate_memory(shape, setup)
    if estimate.total <= device_bytes:
        return None
    fixes = remedies(shape, setup, device_bytes)
    advice = ("set " + ", or ".join(f"{change} ({found.gib():.1f} GiB)" for change, found in fixes)
              if fixes else "use more GPUs with zero_stage=3, or a smaller micro_batch with activation_checkpointing=true")
    return (f"this run needs about {estimate.describe()} per GPU, more than the {device_bytes / GIB:.1f} GiB of "
            f"{device_name} (training/memory.py): {advice}; memory_check=false launches it anyway")


def setup_for(config, world_size: int, precision: str, attention: str, teacher: ModelShape | None = None) -> Setup:
    """The Setup of a CPT config (`training.config.CPTConfig`) on `world_size` GPUs."""
    return Setup(zero_stage=config.zero_stage, world_size=world_size, micro_batch=config.micro_batch,
                 seq_len=config.data.seq_len, checkpointing=config.activation_checkpointing, precision=precision,
                 attention=attention, kernels=config.kernels, bucket_size=config.zero.bucket_size,
                 overlap_comm=config.zero.overlap_comm, teacher=teacher, distill_alpha=config.distill.alpha,
                 distill_chunk=config.distill.chunk)
