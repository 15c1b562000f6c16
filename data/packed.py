"""Packed training sequences from token shards: sequence k of a split, with document masking.

Sequences: the split's shards are one concatenated token stream, cut into consecutive
`seq_len`-token sequences (concatenate-then-split); the final `total % seq_len` tokens are never
used. Labels are the inputs (Hugging Face models shift them inside the loss).

By set (`by_set=True`, what `data.mixture` reads): each source set's tokens are a stream of their
own (its contiguous range in each shard, shard after shard: `data/shards.py` groups documents by
set), cut the same way, so every sequence holds tokens of one set only. The sets' sequences are
numbered one set after the other (sorted by name): `set_ranges[set]` is the index range of a set's
sequences. The map from a sequence to its place on disk is (shards x sets) numbers taken from the
manifest, never a per-document index.

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
from data.shards import DataMismatchError, Manifest, set_ranges

MAX_OPEN_SHARDS = 8  # per process: 2 files and 2 maps each (tokens, document offsets)


class PackedSequences(Dataset):
    """Map-style dataset: sequence k of a split, as input_ids / labels / position_ids tensors.

    Construction reads only the manifest (each shard's token counts give its place in the stream);
    shards are memory-mapped when first read, and at most `max_open_shards` stay mapped per process
    (least recently used first out), so a rank holds O(1) files and maps whatever the corpus size.
    """

    def __init__(self, directory: Path, seq_len: int, split: str = "train", document_masking: bool = True,
                 tokenizer=None, max_open_shards: int = MAX_OPEN_SHARDS, by_set: bool = False):
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
        streams = _set_streams(shards) if by_set else {"": [(k, 0, s["tokens"]) for k, s in enumerate(shards)]}
        segments = [segment for name in sorted(streams) for segment in streams[name]]
        self._segment_shard = np.array([k for k, _, _ in segments], dtype=np.int64)
        self._segment_start = np.array([start for _, start, _ in segments], dtype=np.int64)
        self._segment_ends = np.cumsum([length for _, _, length in segments], dtype=np.int64)
        tokens = {name: sum(length for _, _, length in streams[name]) for name in sorted(streams)}
        counts = [total // seq_len for total in tokens.values()]
        self._stream_starts = np.concatenate([[0], np.cumsum(list(tokens.values()))]).astype(np.int64)
        self._item_ends = np.cumsum(counts, dtype=np.int64)
        self.num_sequences = int(self._item_ends[-1]) if len(counts) else 0
        starts = [0, *self._item_ends[:-1].tolist()]
        self.set_tokens = tokens if by_set else {}  # tokens of each set in the split (a set's stream)
        self.set_ranges = {name: range(first, first + count)  # its sequences' indices
                           for name, first, count in zip(tokens, starts, counts, strict=True)} if by_set else {}
        if self.num_sequences == 0:
            total = sum(tokens.values())
            raise DataMismatchError(f"split {split!r} of {directory} has {total} tokens, fewer than one "
                                    f"sequence of {seq_len}{' in any source set' if by_set else ''}: use more "
                                    "data or a shorter seq_len")
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
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} of {self.num_sequences}")
        group = int(np.searchsorted(self._item_ends, index, side="right"))
        first_item = int(self._item_ends[group - 1]) if group else 0
        start = int(self._stream_starts[group]) + (index - first_item) * self.seq_len
        stop = start + self.seq_len
        pieces, doc_starts = [], []
        segment = int(np.searchsorted(self._segment_ends, start, side="right"))
        position = start
        while position < stop:  # a sequence may span segments (shards), never two sets
            segment_begin = int(self._segment_ends[segment - 1]) if segment else 0
            end = min(stop, int(self._segment_ends[segment]))
            base = int(self._segment_start[segment]) - segment_begin  # stream position -> place in the shard
            lo, hi = position + base, end + base
            tokens, offsets = self._shard(int(self._segment_shard[segment]))
            pieces.append(np.array(tokens[lo:hi], dtype=np.int64))
            first, last = np.searchsorted(offsets, lo, side="left"), np.searchsorted(offsets, hi, side="left")
            doc_starts.append(np.array(offsets[first:last]) - base - start)
            position = end
            segment += 1
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


def _set_streams(shards: list[dict]) -> dict[str, list[tuple[int, int, int]]]:
    """Each source set's stream: (shard index, first token, tokens) of its range in every shard holding it."""
    streams: dict[str, list[tuple[int, int, int]]] = {}
    for k, record in enumerate(shards):
        for name, first, stop in set_ranges(record):
            if stop > first:
                streams.setdefault(name, []).append((k, first, stop - first))
    return streams
