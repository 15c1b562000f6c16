"""Attention over packed documents: which implementations honour document boundaries, and PyTorch's varlen kernel.

`attn_implementation` (checked by `resolve_attention` before any process group or model exists):

  auto               `varlen` on a CUDA GPU, `sdpa` on the CPU
  varlen             PyTorch's own flash-attention varlen kernel (`torch.nn.attention.varlen`, part of
                     the CUDA torch wheel: no compiled extension to install). The loader flattens each
                     micro-batch and passes `cu_seq_lens_q/k` and `max_length_q/k` (`data/varlen.py`);
                     no mask is built. On the CPU the same boundaries run through sdpa one document at a
                     time, so tests and the demo exercise the same batches.
  flash_attention_2/3  the flash-attn package's varlen kernel, fed the same flattened batches
  flex_attention     FlexAttention with a block-sparse document mask, which transformers builds from the
                     restarting `position_ids` at any micro-batch (torchtitan's route); GPU only for
                     training (torch has no FlexAttention backward on the CPU)
  sdpa, eager        a dense block-diagonal mask built from `position_ids` at any micro-batch: correct,
                     but on the GPU a dense mask rules out the flash kernel

Anything else (flash_attention_4, hub kernels, paged attention, a custom function) is refused: we
cannot hand it the boundaries, and transformers' fallback (guessing packing from `position_ids`,
only at micro-batch 1) would let documents attend to each other at micro-batch 2 without a word.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from data.config import ConfigError
from data.varlen import boundaries

ROWS, FLAT = "rows", "flat"
LAYOUTS = {"sdpa": ROWS, "eager": ROWS, "flex_attention": ROWS,
           "varlen": FLAT, "flash_attention_2": FLAT, "flash_attention_3": FLAT}
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (flash_attn_interface)")}
ATTENTION_DOC = ("auto (varlen on GPU, sdpa on CPU), varlen (PyTorch's flash varlen kernel), flex_attention, "
                 "flash_attention_2/3 (flash-attn package), sdpa or eager (dense document mask)")


def resolve_attention(name: str, device: torch.device, precision: str) -> str:
    """The attention implementation to train with, or a ConfigError naming why it cannot mask documents here."""
    if name == "auto":
        name = "varlen" if device.type == "cuda" else "sdpa"
    if name not in LAYOUTS:
        raise ConfigError(f"attn_implementation {name!r} cannot be handed document boundaries, so packed documents "
                          f"would attend to each other: use one of auto, {', '.join(LAYOUTS)}")
    on_gpu = device.type == "cuda"
    if name in FLASH_PACKAGES:
        module, package = FLASH_PACKAGES[name]
        if not on_gpu or importlib.util.find_spec(module) is None:
            raise ConfigError(f"attn_implementation={name} needs a CUDA GPU and the {package} package; "
                              "attn_implementation=varlen runs PyTorch's own flash varlen kernel without it")
    if name == "varlen" and on_gpu:
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise ConfigError(f"attn_implementation=varlen needs torch.nn.attention.varlen (this torch is "
                              f"{torch.__version__}; the project pins 2.13): upgrade torch or use flex_attention")
        if precision not in ("bf16", "fp16"):
            raise ConfigError(f"attn_implementation=varlen runs flash kernels in bf16 or fp16, not {precision}: "
                              "set precision=bf16, or attn_implementation=sdpa")
        if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability(device) < (8, 0):
            raise ConfigError("this GPU or torch build has no flash attention kernel (needs compute capability 8.0+): "
                              "use attn_implementation=sdpa")
    if name == "flex_attention" and not on_gpu:
        raise ConfigError("attn_implementation=flex_attention cannot train on the CPU (torch has no FlexAttention "
                          "backward there): use sdpa on the CPU")
    return name


def uses_flat_batches(name: str) -> bool:
    """Whether the loader must flatten micro-batches and pass their document boundaries (`data/varlen.py`)."""
    return LAYOUTS[name] == FLAT


def _derived_boundaries(position_ids: torch.Tensor | None, padding: torch.Tensor | None, rows: int, seq: int,
                        device: torch.device) -> dict[str, torch.Tensor | int]:
    """Boundaries of a forward that did not pass them (evaluation, LoRA's right-padded rows): every row, and
    every restart of its positions, starts a document. Right padding is invisible to causal attention."""
    if padding is not None and bool((padding[:, 1:] > padding[:, :-1]).any()):
        raise ValueError("varlen attention takes right-padded rows only (padding before tokens found): "
                         "pad on the right, or use attn_implementation=sdpa")
    if position_ids is None:
        position_ids = torch.arange(seq, device=device)
    return boundaries(position_ids.expand(rows, seq))


def _per_document(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cumulative: torch.Tensor,
                  scale: float | None, gqa: bool) -> torch.Tensor:
    """The CPU kernel: causal sdpa on each document alone, (tokens, heads, dim) in and out."""
    edges = cumulative.tolist()
    pieces = [F.scaled_dot_product_attention(query[a:b].transpose(0, 1), key[a:b].transpose(0, 1),
                                             value[a:b].transpose(0, 1), is_causal=True, scale=scale,
                                             enable_gqa=gqa).transpose(0, 1)
              for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return torch.cat(pieces)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     position_ids: torch.Tensor | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (rows, heads, seq, dim) in, (rows, seq, heads, dim) out, causal within
    each document of the given (or derived) boundaries."""
    rows, heads, seq, _ = query.shape
    if cu_seq_lens_q is None:
        found = _derived_boundaries(position_ids, attention_mask, rows, seq, query.device)
        cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k = (
            found["cu_seq_lens_q"], found["cu_seq_lens_k"], found["max_length_q"], found["max_length_k"])
    if dropout or softcap or (sliding_window is not None and max_length_k > sliding_window):
        raise ValueError("varlen attention implements plain causal attention: this model uses attention dropout, "
                         "logit soft-capping or a sliding window shorter than its documents; use attn_implementation="
                         "sdpa or flash_attention_2")
    q, k, v = (x.transpose(1, 2).reshape(rows * seq, x.shape[1], x.shape[3]) for x in (query, key, value))
    gqa = k.shape[1] != heads
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling,
                          window_size=(-1, 0), enable_gqa=gqa)
    else:
        out = _per_document(q, k, v, cu_seq_lens_q, scaling, gqa)
    return out.reshape(rows, seq, heads, out.shape[-1]), None


def register_varlen() -> None:
    """Make `attn_implementation="varlen"` known to transformers; its mask is flash attention's (none, or the
    2-D padding mask), so no dense mask is ever built for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register("varlen", varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen", flash_attention_mask)
