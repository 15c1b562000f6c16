"""The global-batch loader that CPT and LoRA share: a seeded global order, resumable in O(1).

Order: global sample position p (0, 1, 2, ... over the whole run) maps to item
`perm_e(p mod N)` with epoch e = p // N and a fresh seeded permutation per epoch, so the data
repeats in a new order when it runs out. A global batch is positions [s*G, (s+1)*G) for step s;
data-parallel rank r takes the contiguous slice r*G/W .. (r+1)*G/W of it, in micro-batches. The
order is therefore independent of the world size and of the number of loader workers.

State: seed, consumed samples (and the epoch they imply), global batch and the data's
fingerprint. Restoring it is arithmetic: no data is read or skipped.

With a mixture over source sets (`mixture=` weights, `data/mixture.py`), items are the by-set
sequences of `PackedSequences(by_set=True)`, every rank deals each global batch over the sets and
takes its slice, and the state adds the mixture's (weights, credits, draws per set). New weights
(`set_weights`, the dynamic mixture) apply from the next step: the loader drops what its workers
had prefetched and starts again from the consumed position.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit hook now, before ours
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.batch_layout import accumulation_steps
from data.mixture import MixtureState, SetMixture, normalized
from data.permutation import Permutation
from data.shards import DataMismatchError


@dataclass
class LoaderState:
    seed: int
    consumed_samples: int
    global_batch: int
    fingerprint: str
    epoch: int = 0
    mixture: dict | None = None  # MixtureState.as_dict() at consumed_samples; None: the natural order


class DataExhausted(Exception):
    """A source set ran out with on_exhausted=stop: every rank raises it before the same step."""


def check_consumed(consumed_samples: int, global_batch: int) -> None:
    if consumed_samples % global_batch:
        raise DataMismatchError(f"consumed samples {consumed_samples} is not a whole number of global batches "
                                f"of {global_batch}")


class GlobalBatchSampler:
    """Yields this rank's micro-batches of item indices from a given global position onward."""

    exhausted = None  # the natural order never runs out: each epoch starts a new permutation

    def __init__(self, num_items: int, global_batch: int, micro_batch: int, world_size: int, rank: int,
                 seed: int, consumed_samples: int = 0):
        accumulation_steps(global_batch, micro_batch, world_size)
        check_consumed(consumed_samples, global_batch)
        self.num_items, self.global_batch, self.micro_batch = num_items, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.consumed_samples = consumed_samples
        self._permutations: dict[int, Permutation] = {}

    def item_ids(self, positions: np.ndarray) -> np.ndarray:
        epochs = positions // self.num_items
        result = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            perm = self._permutations.get(int(epoch))
            if perm is None:
                perm = self._permutations.setdefault(int(epoch), Permutation(self.num_items,
                                                                             self.seed * 1_000_003 + int(epoch)))
            result[mask] = perm(positions[mask] % self.num_items)
        return result

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.world_size
        step = self.consumed_samples // self.global_batch
        while True:
            first = step * self.global_batch + self.rank * per_rank
            for micro in range(0, per_rank, self.micro_batch):
                positions = np.arange(first + micro, first + micro + self.micro_batch, dtype=np.int64)
                yield self.item_ids(positions).tolist()
            step += 1


class MixtureBatchSampler:
    """Like `GlobalBatchSampler`, over a mixture: each global batch is dealt whole (the same on every rank),
    then this rank yields its slice. Keeps the state after each step it dealt, and that step's notes, for
    the loader to take when the step is consumed (it may run ahead of training by the workers' prefetch)."""

    def __init__(self, mixture: SetMixture, state: MixtureState, global_batch: int, micro_batch: int,
                 world_size: int, rank: int, consumed_samples: int):
        self.mixture, self.state = mixture, state
        self.global_batch, self.micro_batch, self.world_size, self.rank = global_batch, micro_batch, world_size, rank
        self.step = consumed_samples // global_batch
        self.after: dict[int, tuple[MixtureState, list[str]]] = {}
        self.exhausted: str | None = None

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.world_size
        state, step = self.state, self.step
        while True:
            draw = self.mixture.draw(state, self.global_batch, step)
            if draw.items is None:
                self.exhausted = draw.notes[-1]
                return
            self.after[step] = (draw.state, draw.notes)
            mine = draw.items[self.rank * per_rank:(self.rank + 1) * per_rank]
            for micro in range(0, per_rank, self.micro_batch):
                yield mine[micro:micro + self.micro_batch].tolist()
            state, step = draw.state, step + 1


# Slurm (preemption, scancel, scontrol requeue) signals every process of a job step, DataLoader workers
# too. torch's worker handler lets a SIGTERM from anyone but the rank kill the worker, and the rank's
# next batch then fails before it can commit a checkpoint; SIGUSR1 kills by default. Workers ignore
# both: the rank gets the same signal and stops at the next step boundary, then shuts its workers down.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the rank, not its workers, acts on stop signals."""
    for stop_signal in WORKER_IGNORED_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


# The DataLoader iterators of this process that may still have workers. One outlives its loop when an
# exception's traceback holds it (a run that fails mid-step) or a script keeps it to the end.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _shut_down_leftover_workers() -> None:
    """At the rank's exit, before multiprocessing's own exit hook (which SIGTERMs daemonic children, then
    joins them: a worker ignores that SIGTERM and would be waited for forever). Each loader shuts its workers
    down the way it does at the end of a loop; killing them instead made torch's SIGCHLD handler print a
    "DataLoader worker ... is killed by signal: Killed" traceback after the run's real error. A worker that
    still lives after that (none seen) is killed."""
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()  # torch's own shutdown (private, as Lightning calls it at teardown)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_shut_down_leftover_workers)  # after multiprocessing's hook, so it runs before it


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def to_device(batch: dict[str, torch.Tensor | int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """Tensors to the device (non-blocking); plain values (varlen's longest document) stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class GlobalBatchLoader:
    """This rank's endless stream of micro-batches, with a tiny resumable state.

    Any map-style dataset with a `fingerprint` works (packed token sequences for CPT, Alpaca
    examples for LoRA); `collate_fn` turns a micro-batch of its items into tensors. With `mixture`
    (weights per set; the dataset must be `PackedSequences(by_set=True)`) samples follow the weights,
    and a set that runs out wraps to a new epoch or, with `on_exhausted="stop"`, ends the stream with
    `DataExhausted` before the step that would need it.
    """

    def __init__(self, dataset: Dataset, global_batch: int, micro_batch: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, num_workers: int = 0, consumed_samples: int = 0,
                 collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]] = collate,
                 mixture: dict[str, float] | None = None, on_exhausted: str = "wrap"):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.world_size, self.rank, self.seed, self.num_workers = world_size, rank, seed, num_workers
        self.accumulation = accumulation_steps(global_batch, micro_batch, world_size)
        check_consumed(consumed_samples, global_batch)
        self.consumed_samples = consumed_samples
        self.on_exhausted = on_exhausted
        self.mixture_state: MixtureState | None = None
        if mixture is not None:
            ranges = dataset.set_ranges
            if set(mixture) - set(ranges):
                raise ValueError(f"mixture names sets the data does not have: {sorted(set(mixture) - set(ranges))}")
            self.mixture_state = MixtureState(normalized({name: mixture.get(name, 0.0) for name in ranges}))
        self._restart = False
        self._notes: list[str] = []

    @property
    def weights(self) -> dict[str, float] | None:
        return dict(self.mixture_state.weights) if self.mixture_state is not None else None

    def set_weights(self, weights: dict[str, float]) -> None:
        """New mixture weights, from the next step on (samples prefetched with the old ones are dropped)."""
        self.mixture_state = self.mixture_state.with_weights(weights)
        self._restart = True

    def pop_notes(self) -> list[str]:
        """What happened to the data in the steps consumed since the last call (a set wrapped), to log."""
        notes, self._notes = self._notes, []
        return notes

    def state_dict(self) -> dict:
        mixture = self.mixture_state.as_dict() if self.mixture_state is not None else None
        return asdict(LoaderState(self.seed, self.consumed_samples, self.global_batch,
                                  self.dataset.fingerprint, self.consumed_samples // len(self.dataset), mixture))

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.dataset.fingerprint:
            raise DataMismatchError("the checkpoint's data position belongs to other data (fingerprint "
                                    "differs): resume with the data the run started with")
        if state["global_batch"] != self.global_batch:
            raise DataMismatchError(f"the checkpoint was trained with global batch {state['global_batch']}, "
                                    f"not {self.global_batch}: keep the global batch to resume exactly")
        saved = state.get("mixture")
        if (saved is None) != (self.mixture_state is None) or (
                saved is not None and set(saved["weights"]) != set(self.mixture_state.weights)):
            taken = "the natural order" if saved is None else f"a mixture over {', '.join(sorted(saved['weights']))}"
            raise DataMismatchError(f"the checkpoint's data position was taken in {taken}: keep data.mixture as it "
                                    "was to resume exactly")
        self.seed = state["seed"]
        self.consumed_samples = state["consumed_samples"]
        if saved is not None:
            self.mixture_state = MixtureState(saved["weights"], saved["credit"], saved["drawn"])

    def _sampler(self) -> GlobalBatchSampler | MixtureBatchSampler:
        if self.mixture_state is None:
            return GlobalBatchSampler(len(self.dataset), self.global_batch, self.micro_batch, self.world_size,
                                      self.rank, self.seed, self.consumed_samples)
        return MixtureBatchSampler(SetMixture(self.dataset.set_ranges, self.seed, self.on_exhausted),
                                   self.mixture_state, self.global_batch, self.micro_batch, self.world_size,
                                   self.rank, self.consumed_samples)

    def _step_consumed(self, sampler: GlobalBatchSampler | MixtureBatchSampler) -> None:
        if isinstance(sampler, MixtureBatchSampler):
            self.mixture_state, notes = sampler.after.pop(self.consumed_samples // self.global_batch)
            self._notes.extend(notes)
        self.consumed_samples += self.global_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # one pass per set of weights: set_weights starts a new one at the next step
            sampler = self._sampler()
            # its own generator: a DataLoader draws a seed from torch's global RNG on every iter(), which
            # would shift the dropout stream of a resumed run against an uninterrupted one
            batches = iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                                      num_workers=self.num_workers, persistent_workers=False,
                                      worker_init_fn=ignore_stop_signals if self.num_workers else None,
                                      generator=torch.Generator().manual_seed(self.seed)))
            if self.num_workers:
                _LIVE_ITERATORS.add(batches)
            self._restart = False
            micro = 0
            for batch in batches:
                micro += 1
                if micro == self.accumulation:  # a whole global step has been handed out
                    micro = 0
                    self._step_consumed(sampler)
                yield batch
                if micro == 0 and self._restart:
                    break
            else:
                if sampler.exhausted is not None:
                    raise DataExhausted(sampler.exhausted)
                return
            del batches  # shuts down its workers and drops what they prefetched
