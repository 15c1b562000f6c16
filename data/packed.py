"""Packed training sequences from token shards: sequence k of a split, with document masking.

Sequences: the split's shards are one concatenated token stream, cut into consecutive
`seq_len`-token sequences (concatenate-then-split); the final `total % seq_len` tokens are never
used. Labels are the inputs (Hugging Face models shift them inside the loss).

The order in which sequences are read, and the resumable state, are `data/loader.py`'s.

Document masking (default on): each sequence carries `position_ids` that restart at 0 at every
document start, and the label of each document's first token is -100 so no token is trained to
predict the start of the next document. Given `position_ids` and no attention mask, transformers
builds a block-diagonal causal mask (sdpa/eager on CPU) or uses flash-attention's varlen path
(`attn_implementation="flash_attention_2"` on GPU), so attention never crosses documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.nll import IGNORE_INDEX
from data.shards import DataMismatchError, Manifest


class PackedSequences(Dataset):
    """Map-style dataset: sequence k of a split, as input_ids / labels / position_ids tensors."""

    def __init__(self, directory: Path, seq_len: int, split: str = "train", document_masking: bool = True,
                 tokenizer=None):
        self.manifest = Manifest.load(directory)
        if tokenizer is not None:
            self.manifest.check_tokenizer(tokenizer)
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.split = split
        self._shards = [s for s in self.manifest.shards(split) if s["tokens"] > 0]
        self._ends = np.cumsum([s["tokens"] for s in self._shards], dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self.num_sequences = total // seq_len
        if self.num_sequences == 0:
            raise DataMismatchError(f"split {split!r} of {directory} has {total} tokens, fewer than one "
                                    f"sequence of {seq_len}: use more data or a shorter seq_len")
        self._tokens: list[np.ndarray] | None = None
        self._docs: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def _open(self) -> None:
        """Memory-map the shards lazily, in the process (loader worker) that reads them."""
        base = self.manifest.directory / self.split
        self._tokens = [np.memmap(base / f"{s['name']}.tokens", dtype=self.manifest.dtype, mode="r")
                        for s in self._shards]
        self._docs = [np.load(base / f"{s['name']}.docs.npy", mmap_mode="r") for s in self._shards]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            self._open()
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        pieces, doc_starts = [], []
        shard = int(np.searchsorted(self._ends, start, side="right"))
        position = start
        while position < stop:
            shard_start = int(self._ends[shard - 1]) if shard else 0
            lo, hi = position - shard_start, min(stop, int(self._ends[shard])) - shard_start
            pieces.append(np.asarray(self._tokens[shard][lo:hi], dtype=np.int64))
            offsets = self._docs[shard]
            first, last = np.searchsorted(offsets, lo, side="left"), np.searchsorted(offsets, hi, side="left")
            doc_starts.append(np.asarray(offsets[first:last]) + shard_start - start)
            position = hi + shard_start
            shard += 1
        input_ids = torch.from_numpy(np.concatenate(pieces))
        labels = input_ids.clone()
        if not self.document_masking:
            return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(self.seq_len)}
        starts = np.concatenate(doc_starts).astype(np.int64)
        starts = starts[starts > 0]
        labels[torch.from_numpy(starts)] = IGNORE_INDEX
        reset = np.zeros(self.seq_len, dtype=np.int64)
        reset[starts] = starts  # position = index - start of its document
        position_ids = np.arange(self.seq_len) - np.maximum.accumulate(reset)
        return {"input_ids": input_ids, "labels": labels, "position_ids": torch.from_numpy(position_ids)}
