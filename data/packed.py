"""Packed training sequences from token shards: sequence k of a split, with document masking.

Sequences: the split's shards are one concatenated token stream, cut into consecutive
`seq_len`-token sequences (concatenate-then-split); the final `total % seq_len` tokens are never
used. Labels are the inputs (Hugging Face models shift them inside the loss).

The order in which sequences are read, and the resumable state, are `data/loader.py`'s.

Document masking (default on): each sequence carries `position_ids` that restart at 0 at every
document start, and the label of each document's first token is -100 so no token is trained to
predict the start of the next document. The attention kernel learns the document boundaries from
these `position_ids`: `data/varlen.py` flattens a micro-batch into the varlen form (cu_seq_lens)
for the varlen and flash-attention paths, and sdpa/eager build a block-diagonal mask from them
(`training/attention.py` says which path runs and refuses one that would not mask).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.nll import IGNORE_INDEX
from data.shards import DataMismatchError, Manifest

MAX_OPEN_SHARDS = 8  # per process: 2 files and 2 maps each (tokens, document offsets)


class PackedSequences(Dataset):
    """Map-style dataset: sequence k of a split, as input_ids / labels / position_ids tensors.

    Construction reads only the manifest (each shard's token count gives its place in the stream);
    shards are memory-mapped when first read, and at most `max_open_shards` stay mapped per process
    (least recently used first out), so a rank holds O(1) files and maps whatever the corpus size.
    """

    def __init__(self, directory: Path, seq_len: int, split: str = "train", document_masking: bool = True,
                 tokenizer=None, max_open_shards: int = MAX_OPEN_SHARDS):
        if max_open_shards < 1:
            raise ValueError("max_open_shards must be at least 1")
        self.manifest = Manifest.load(directory)
        if tokenizer is not None:
            self.manifest.check_tokenizer(tokenizer)
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.split = split
        self.max_open_shards = max_open_shards
        shards = [s for s in self.manifest.shards(split) if s["tokens"] > 0]
        self._names = [s["name"] for s in shards]
        self._ends = np.cumsum([s["tokens"] for s in shards], dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self.num_sequences = total // seq_len
        if self.num_sequences == 0:
            raise DataMismatchError(f"split {split!r} of {directory} has {total} tokens, fewer than one "
                                    f"sequence of {seq_len}: use more data or a shorter seq_len")
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.num_sequences

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # a loader worker maps its own shards

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document offsets of shard k, mapped on first use; the least recently used map
        is dropped (unmapped and its file closed, no other reference exists) beyond the limit."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        while len(self._open) >= self.max_open_shards:
            self._open.popitem(last=False)
        base = self.manifest.directory / self.split / self._names[k]
        shard = (np.memmap(f"{base}.tokens", dtype=self.manifest.dtype, mode="r"),
                 np.load(f"{base}.docs.npy", mmap_mode="r"))
        self._open[k] = shard
        return shard

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        pieces, doc_starts = [], []
        shard = int(np.searchsorted(self._ends, start, side="right"))
        position = start
        while position < stop:
            shard_start = int(self._ends[shard - 1]) if shard else 0
            lo, hi = position - shard_start, min(stop, int(self._ends[shard])) - shard_start
            tokens, offsets = self._shard(shard)
            pieces.append(np.array(tokens[lo:hi], dtype=np.int64))
            first, last = np.searchsorted(offsets, lo, side="left"), np.searchsorted(offsets, hi, side="left")
            doc_starts.append(np.array(offsets[first:last]) + shard_start - start)
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
