"""Perplexity of a text stream, measured as the paper's code measures WikiText-2 and PTB.

The rows are joined with "\\n\\n", tokenized without special tokens, one BOS is put before the
whole stream (`bos="once"`, LLaMA) or before every segment (`bos="every"`, needed for Gemma), and
the stream is cut into non-overlapping `seq_len`-token segments; the remainder is dropped.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.nll import TokenNLL
from training.evaluation.config import BosPolicy


def segment_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                   bos: BosPolicy = "once", max_segments: int | None = None) -> torch.Tensor:
    """LongTensor [segments, seq_len] cut from the joined, tokenized texts."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    if bos != "none" and bos_id is None:
        raise ValueError("the tokenizer has no BOS token: use bos=none")
    body = seq_len - 1 if bos == "every" else seq_len
    if bos == "once":
        ids = [bos_id, *ids]
    count = len(ids) // body
    if max_segments is not None:
        count = min(count, max_segments)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one {seq_len}-token segment")
    segments = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos == "every":
        segments = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), segments], dim=1)
    return segments


@torch.no_grad()
def perplexity(model: PreTrainedModel, segments: torch.Tensor, batch_size: int = 8,
               progress: bool = False) -> float:
    """exp(mean next-token NLL over every predicted token of every segment)."""
    device = next(model.parameters()).device
    nll = TokenNLL()
    for batch in tqdm(segments.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        nll.add(model(input_ids=batch, labels=batch, use_cache=False).loss, batch)
    return nll.perplexity
