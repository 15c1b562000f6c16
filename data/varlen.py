"""Packed rows as one flattened row with explicit document boundaries: the varlen attention form.

Flash-style attention kernels (`varlen`, `flash_attention_2/3`) take the documents of a micro-batch
as one stream of tokens plus cumulative document lengths (`cu_seq_lens_q/k`) and the longest
document (`max_length_q/k`). The loader hands them over with every micro-batch, so the kernel never
has to guess packing from `position_ids` (transformers only does that at micro-batch 1).

A document starts at every row start and wherever a position does not follow its predecessor
(`position_ids[t] != position_ids[t-1] + 1`), the rule transformers applies for sdpa and flex
attention. In the flattened row the first label of every row is ignored: the last token of one
row must not learn to predict the first token of the next.
"""

from __future__ import annotations

import torch

from data.loader import collate
from data.nll import IGNORE_INDEX

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the documents of a (rows, seq) batch, row by row, in order."""
    rows, seq = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()
    return torch.diff(first, append=torch.tensor([rows * seq], device=first.device))


def boundaries(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """The varlen keyword arguments of a (rows, seq) batch: int32 cumulative lengths and the longest document."""
    lengths = document_lengths(position_ids)
    cumulative = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=position_ids.device)
    cumulative[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max())
    return dict(zip(VARLEN_KEYS, (cumulative, cumulative, longest, longest), strict=True))


def row_boundaries(rows: int, seq: int, device: torch.device) -> dict[str, torch.Tensor | int]:
    """The varlen keyword arguments of rows that are one document each (no restarting positions), without reading
    anything back from the device."""
    cumulative = torch.arange(0, (rows + 1) * seq, seq, dtype=torch.int32, device=device)
    return dict(zip(VARLEN_KEYS, (cumulative, cumulative, seq, seq), strict=True))


def flatten_documents(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
    """A (rows, seq) packed batch as one (1, rows x seq) row with its document boundaries."""
    if "attention_mask" in batch:
        raise ValueError("flatten_documents takes packed rows without padding (no attention_mask)")
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX  # in the flat row it would be the target of the previous row's last token
    flat = {"input_ids": batch["input_ids"].reshape(1, -1), "labels": labels.reshape(1, -1),
            "position_ids": batch["position_ids"].reshape(1, -1)}
    return {**flat, **boundaries(batch["position_ids"])}


def varlen_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """`collate` for the varlen attention form: a micro-batch of packed sequences, flattened."""
    return flatten_documents(collate(samples))

