"""Packed multi-document batches, and the check every attention path must pass to be trusted with them.

  packed_samples(count, seq_len, vocab, seed)    packed sequences as PackedSequences returns them
  block_diagonal_mask(position_ids)              the reference's explicit mask
  masking_check(path, device, dtype)             a path trained for a few optimizer steps against the reference

The reference is fp32 eager attention with an explicit block-diagonal causal mask (built here, not by
transformers); the control is the same fp32 model with plain causal attention across documents. A path
agrees when its losses and last gradients are ten times closer to the reference than the control's are:
at random initialisation a masked and an unmasked model differ by ~0.5% in loss but by ~100% in gradients,
while bf16 kernels stay within ~2% of the reference, so a masking bug cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.loader import collate
from data.nll import IGNORE_INDEX

CHECK_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=512)  # grouped key/value heads, as Llama-3's
TINY_CHECK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256)  # the CPU's smoke runs
CHECK_SEQ, TINY_CHECK_SEQ, CHECK_MICRO, CHECK_STEPS, CHECK_LR = 256, 64, 2, 4, 1e-3
AGREEMENT = 0.1  # a path's error over the control's


def packed_samples(count: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Packed sequences: documents of random lengths (mean ~seq/3), positions restarting at each, the label of
    each document's first token ignored."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (seq_len,), generator=generator)
        lengths = torch.randint(1, 2 * seq_len // 3, (seq_len,), generator=generator).cumsum(0)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths[lengths < seq_len]])
        labels = input_ids.clone()
        labels[starts[1:]] = IGNORE_INDEX
        reset = torch.zeros(seq_len, dtype=torch.long)
        reset[starts] = starts
        samples.append({"input_ids": input_ids, "labels": labels,
                        "position_ids": torch.arange(seq_len) - torch.cummax(reset, 0).values})
    return samples


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """An additive (rows, 1, seq, seq) mask, causal inside each document and closed across them."""
    rows, seq = position_ids.shape
    document = (position_ids == 0).cumsum(1)
    allowed = (document[:, :, None] == document[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool,
                                                                          device=position_ids.device).tril()
    return torch.zeros(rows, 1, seq, seq, device=position_ids.device).masked_fill(~allowed[:, None],
                                                                                  torch.finfo(torch.float32).min)


@dataclass
class MaskingResult:
    losses: list[float]
    loss_error: float  # largest relative loss difference to the reference over the steps
    grad_error: float  # relative L2 distance of the last step's gradients to the reference's
    control_loss_error: float
    control_grad_error: float

    @property
    def agrees(self) -> bool:
        return (self.loss_error < AGREEMENT * self.control_loss_error
                and self.grad_error < AGREEMENT * self.control_grad_error)

    def summary(self) -> dict:
        return {"losses": self.losses, "loss_error": self.loss_error, "grad_error": self.grad_error,
                "control_loss_error": self.control_loss_error, "control_grad_error": self.control_grad_error,
                "agrees": self.agrees}


def _train(model: torch.nn.Module, batches: list[dict]) -> tuple[list[float], torch.Tensor]:
    """CHECK_STEPS optimizer steps; the losses and the last step's gradients (fp32, flattened)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=CHECK_LR)
    losses, grads = [], None
    for batch in batches:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _errors(losses, grads, reference) -> tuple[float, float]:
    ref_losses, ref_grads = reference
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    return loss_error, float((grads - ref_grads).norm() / ref_grads.norm())


def masking_check(attention: str, device: torch.device, dtype: torch.dtype, kernels: str = "none",
                  compile_blocks: bool = False, shape: dict | None = None, seq_len: int = CHECK_SEQ,
                  collate_path=None) -> MaskingResult:
    """Train a small Llama with `attention` (and Liger kernels or compiled blocks) on packed multi-document
    batches, and the fp32 references from the same weights, on the same batches. `collate_path` replaces the
    path's own batching (a test hands it a broken one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data.loader import to_device
    from data.varlen import varlen_collate
    from training.attention import attach_boundaries, register_varlen, uses_flat_batches
    from training.kernels import speed_up

    register_varlen()
    shape = shape or CHECK_SHAPE
    config = LlamaConfig(**shape, max_position_embeddings=seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    weights = AutoModelForCausalLM.from_config(config).state_dict()
    samples = [packed_samples(CHECK_MICRO, seq_len, shape["vocab_size"], seed=step)
               for step in range(CHECK_STEPS)]

    def model_with(attn: str, model_dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        model.load_state_dict(weights)
        return model.to(device=device, dtype=model_dtype).train()

    rows = [to_device(collate(s), device) for s in samples]
    reference = _train(model_with("eager", torch.float32),
                       [{**b, "attention_mask": block_diagonal_mask(b["position_ids"])} for b in rows])
    control = _train(model_with("sdpa", torch.float32),
                     [{k: v for k, v in b.items() if k != "position_ids"} for b in rows])
    model = model_with(attention, dtype)
    if attention == "varlen":
        attach_boundaries(model)
    speed_up(model, kernels, compile_blocks, False)
    batching = collate_path or (varlen_collate if uses_flat_batches(attention) else collate)
    batches = [to_device(batching(s), device) for s in samples]
    losses, grads = _train(model, batches)
    return MaskingResult(losses, *_errors(losses, grads, reference), *_errors(*control, reference))
