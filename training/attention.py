"""Attention over packed documents: which implementations honour document boundaries, and PyTorch's varlen kernel.

`attn_implementation` (checked by `resolve_attention` before any process group or model exists):

  auto               `varlen` on a CUDA GPU, `sdpa` on the CPU
  varlen             PyTorch's own flash-attention varlen kernel (`torch.nn.attention.varlen`, part of
                     the CUDA torch wheel: no compiled extension to install). The loader flattens each
                     micro-batch and passes `cu_seq_lens_q/k` and `max_length_q/k` (`data/varlen.py`);
                     no mask is built. Forwards without them (LoRA's padded rows, lm-eval) get them from
                     `attach_boundaries`, once per forward. The kernel's keywords are read from its
                     signature (torch 2.10 to 2.13 differ: `varlen_keywords`). On the CPU the same
                     boundaries run through `PerDocumentAttention`, which keeps what the CUDA kernel keeps,
                     so tests, the demo and the memory measurements exercise the same batches.
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
import inspect
import math

import torch

from data.config import ConfigError
from data.varlen import boundaries, row_boundaries

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
        check_varlen_kernel()
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


def varlen_keywords(kernel, scale: float | None, head_dim: int, gqa: bool) -> dict:
    """The keyword arguments this torch's `varlen_attn` takes for causal attention at `scale`: its signature is read,
    not its version. torch 2.10 has `is_causal` and no `scale`; 2.11 has `window_size` and `scale`; 2.13 adds
    `enable_gqa`, passed only when the model has fewer key/value heads than query heads (without the keyword the
    flash kernel takes such heads as they are, as it does for flash-attn)."""
    params = inspect.signature(kernel).parameters
    if "window_size" in params:
        keywords = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        keywords = {"is_causal": True}
    else:
        raise TypeError(f"this torch's varlen_attn{inspect.signature(kernel)} takes neither window_size nor "
                        "is_causal: use attn_implementation=sdpa")
    if "scale" in params:
        keywords["scale"] = scale
    elif scale is not None and not math.isclose(scale, head_dim ** -0.5):
        raise TypeError(f"this torch's varlen_attn takes no scale, and the model scales attention by {scale}, not "
                        "1/sqrt(head_dim): use attn_implementation=sdpa")
    if gqa and "enable_gqa" in params:
        keywords["enable_gqa"] = True
    return keywords


def check_varlen_kernel() -> None:
    """Refuse, before anything starts, a torch whose varlen kernel we cannot call causally."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise ConfigError(f"attn_implementation=varlen needs torch.nn.attention.varlen.varlen_attn (torch 2.10 or "
                          f"later; this torch is {torch.__version__}): upgrade torch or use flex_attention") from err
    try:
        varlen_keywords(varlen_attn, None, 128, gqa=False)
    except TypeError as err:
        raise ConfigError(str(err)) from err


class PerDocumentAttention(torch.autograd.Function):
    """The CPU kernel: causal attention on each document alone, (tokens, heads, dim) in and out. It keeps for the
    backward pass what the CUDA varlen kernel keeps (query, key, value, output and the fp32 log-sum-exp), so the
    activation memory measured on the CPU is the GPU's (`training/memory.py`). Grouped key/value heads are taken
    as they are, like the flash kernel."""

    @staticmethod
    def forward(ctx, query, key, value, cumulative, scale):
        edges = cumulative.tolist()
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float32)
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            piece, piece_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(x[a:b].transpose(0, 1)[None] for x in (query, key, value)), 0.0, True, scale=scale)
            out[a:b], lse[:, a:b] = piece[0].transpose(0, 1), piece_lse[0]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.edges, ctx.scale = edges, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (query, key, value)]
        for a, b in zip(ctx.edges[:-1], ctx.edges[1:], strict=True):
            pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *(x[a:b].transpose(0, 1)[None] for x in (grad_out, query, key, value, out)), lse[None, :, a:b],
                0.0, True, scale=ctx.scale)
            for grad, piece in zip(grads, pieces, strict=True):
                grad[a:b] = piece[0].transpose(0, 1)
        return *grads, None, None


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (rows, heads, seq, dim) in, (rows, seq, heads, dim) out, causal within
    each document of the boundaries the loader passed or `attach_boundaries` derived once for this forward."""
    rows, heads, seq, head_dim = query.shape
    if cu_seq_lens_q is None:
        raise ValueError("varlen attention got no document boundaries: the model must go through "
                         "training.attention.attach_boundaries (load_model does it); KV-cached generation is not a "
                         "varlen use: generate with attn_implementation=sdpa")
    if dropout or softcap or (sliding_window is not None and max_length_k > sliding_window):
        raise ValueError("varlen attention implements plain causal attention: this model uses attention dropout, "
                         "logit soft-capping or a sliding window shorter than its documents; use attn_implementation="
                         "sdpa or flash_attention_2")
    q, k, v = (x.transpose(1, 2).reshape(rows * seq, x.shape[1], x.shape[3]) for x in (query, key, value))
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                          **varlen_keywords(varlen_attn, scaling, head_dim, k.shape[1] != heads))
    else:
        out = PerDocumentAttention.apply(q, k, v, cu_seq_lens_q, scaling)
    return out.reshape(rows, seq, heads, out.shape[-1]), None


def forward_boundaries(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook on the decoder: the document boundaries of a forward that was not handed them
    (evaluation, LoRA's right-padded rows), computed once here instead of in every layer. Every row, and every
    restart of its positions, starts a document; right padding is invisible to causal attention. Rows without
    position_ids cost no device sync; the padding check costs one."""
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cache", kwargs.get("past_key_values")) is not None:
        return args, kwargs  # the loader's boundaries, or a cached generation step (refused by the kernel)
    ids = kwargs.get("input_ids", args[0] if args else None)
    rows, seq = (ids if ids is not None else kwargs["inputs_embeds"]).shape[:2]
    padding, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if padding is not None and padding.dim() == 2 and bool((padding[:, 1:] > padding[:, :-1]).any()):
        raise ValueError("varlen attention takes right-padded rows only (padding before tokens found): "
                         "pad on the right, or use attn_implementation=sdpa")
    device = (ids if ids is not None else kwargs["inputs_embeds"]).device
    found = row_boundaries(rows, seq, device) if position_ids is None else boundaries(position_ids.expand(rows, seq))
    return args, {**kwargs, **found}


def attach_boundaries(model: torch.nn.Module) -> None:
    """Hand every forward of `model` (a varlen model) its document boundaries, once per forward."""
    model.get_decoder().register_forward_pre_hook(forward_boundaries, with_kwargs=True)


def register_varlen() -> None:
    """Make `attn_implementation="varlen"` known to transformers; its mask is flash attention's (none, or the
    2-D padding mask), so no dense mask is ever built for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register("varlen", varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen", flash_attention_mask)
