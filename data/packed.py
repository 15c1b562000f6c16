"""Packed training sequences from token shards, in a seeded global order, resumable in O(1).

Sequences: the split's shards are one concatenated token stream, cut into consecutive
`seq_len`-token sequences (concatenate-then-split); the final `total % seq_len` tokens are never
used. Labels are the inputs (Hugging Face models shift them inside the loss).

Order: global sample position p (0, 1, 2, ... over the whole run) maps to sequence
`perm_e(p mod N)` with epoch e = p // N and a fresh seeded permutation per epoch, so the data
repeats in a new order when it runs out. A global batch is positions [s*G, (s+1)*G) for step s;
data-parallel rank r takes the contiguous slice r*G/W .. (r+1)*G/W of it, in micro-batches. The
order is therefore independent of the world size and of the number of loader workers.

State: seed, consumed samples (and the epoch they imply), global batch and the manifest
fingerprint. Restoring it is arithmetic: no data is read or skipped.

Document masking (default on): each sequence carries `position_ids` that restart at 0 at every
document start, and the label of each document's first token is -100 so no token is trained to
predict the start of the next document. Given `position_ids` and no attention mask, transformers
builds a block-diagonal causal mask (sdpa/eager on CPU) or uses flash-attention's varlen path
(`attn_implementation="flash_attention_2"` on GPU), so attention never crosses documents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.permutation import Permutation
from data.shards import DataMismatchError, Manifest

IGNORE_INDEX = -100
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


@dataclass
class LoaderState:
    seed: int
    consumed_samples: int
    global_batch: int
    fingerprint: str
    epoch: int = 0


def check_batch_layout(global_batch: int, micro_batch: int, world_size: int, consumed_samples: int) -> int:
    """Gradient accumulation steps for this layout; refuses a global batch that does not divide."""
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} x "
                         f"world size {world_size}")
    if consumed_samples % global_batch:
        raise ValueError(f"consumed samples {consumed_samples} is not a whole number of global batches "
                         f"of {global_batch}")
    return global_batch // (micro_batch * world_size)


class GlobalBatchSampler:
    """Yields this rank's micro-batches of sequence indices from a given global position onward."""

    def __init__(self, num_sequences: int, global_batch: int, micro_batch: int, world_size: int, rank: int,
                 seed: int, consumed_samples: int = 0):
        check_batch_layout(global_batch, micro_batch, world_size, consumed_samples)
        self.num_sequences, self.global_batch, self.micro_batch = num_sequences, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.consumed_samples = consumed_samples
        self._permutations: dict[int, Permutation] = {}

    def sequence_ids(self, positions: np.ndarray) -> np.ndarray:
        epochs = positions // self.num_sequences
        result = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            perm = self._permutations.get(int(epoch))
            if perm is None:
                perm = self._permutations.setdefault(int(epoch), Permutation(self.num_sequences,
                                                                             self.seed * 1_000_003 + int(epoch)))
            result[mask] = perm(positions[mask] % self.num_sequences)
        return result

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.world_size
        step = self.consumed_samples // self.global_batch
        while True:
            first = step * self.global_batch + self.rank * per_rank
            for micro in range(0, per_rank, self.micro_batch):
                positions = np.arange(first + micro, first + micro + self.micro_batch, dtype=np.int64)
                yield self.sequence_ids(positions).tolist()
            step += 1


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class PackedLoader:
    """This rank's endless stream of micro-batches, with a tiny resumable state.

    Any map-style dataset with a `fingerprint` works (Alpaca examples for LoRA too); `collate_fn`
    turns a micro-batch of its items into tensors.
    """

    def __init__(self, dataset: Dataset, global_batch: int, micro_batch: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, num_workers: int = 0, consumed_samples: int = 0,
                 collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]] = collate):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.world_size, self.rank, self.seed, self.num_workers = world_size, rank, seed, num_workers
        self.accumulation = check_batch_layout(global_batch, micro_batch, world_size, consumed_samples)
        self.consumed_samples = consumed_samples

    def state_dict(self) -> dict:
        return asdict(LoaderState(self.seed, self.consumed_samples, self.global_batch,
                                  self.dataset.fingerprint, self.consumed_samples // len(self.dataset)))

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.dataset.fingerprint:
            raise DataMismatchError("the checkpoint's data position belongs to other data (fingerprint "
                                    "differs): resume with the data the run started with")
        if state["global_batch"] != self.global_batch:
            raise DataMismatchError(f"the checkpoint was trained with global batch {state['global_batch']}, "
                                    f"not {self.global_batch}: keep the global batch to resume exactly")
        self.seed = state["seed"]
        self.consumed_samples = state["consumed_samples"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = GlobalBatchSampler(len(self.dataset), self.global_batch, self.micro_batch, self.world_size,
                                     self.rank, self.seed, self.consumed_samples)
        # its own generator: a DataLoader draws a seed from torch's global RNG on every iter(), which
        # would shift the dropout stream of a resumed run against an uninterrupted one
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.seed))
        micro = 0
        for batch in loader:
            micro += 1
            if micro == self.accumulation:  # a whole global step has been handed out
                micro = 0
                self.consumed_samples += self.global_batch
            yield batch
