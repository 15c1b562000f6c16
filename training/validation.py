"""Held-out loss on the data's validation split, a periodic evaluation of the trainer, overall and per source set.

The first `sequences` validation sequences (or examples) (rounded down to a multiple of the world size) are
split evenly across ranks, so every rank runs the same number of forward passes (ZeRO-3 gathers
parameters collectively and would hang otherwise). The loss is averaged per predicted token over
all ranks, not per batch.

Per source set (`SetLosses`, CPT): the same on the first `sequences` held-out sequences of each set
(`PackedSequences(by_set=True)`, so every sequence is one set's text), micro-batches never mixing
sets, all sets reduced in one all-reduce: `val.loss.<set>` and `val.ppl.<set>`. A set with fewer
held-out sequences than ranks is left out. The dynamic mixture reads the same numbers; they are
measured once per step whoever asks first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from data.loader import collate, to_device
from data.nll import TokenNLL
from training.distributed import WorldInfo, all_sum


def rank_slice(count: int, world: WorldInfo) -> range:
    """This rank's share of the first `count` items, rounded down to a multiple of the world size."""
    per_rank = count // world.world_size
    return range(world.rank * per_rank, (world.rank + 1) * per_rank)


def token_nll(engine, dataset: Dataset, indices: range | list[int], micro_batch: int,
              collate_fn: Callable[[list], dict[str, torch.Tensor]]) -> TokenNLL:
    """Summed next-token NLL and predicted tokens of these items, a micro-batch at a time."""
    nll = TokenNLL()
    indices = list(indices)
    for start in range(0, len(indices), micro_batch):
        batch = to_device(collate_fn([dataset[i] for i in indices[start:start + micro_batch]]), engine.device)
        nll.add(engine(**batch, use_cache=False).loss, batch["labels"])
    return nll


class SetLosses:
    """Held-out loss per source set: {set: (summed NLL, tokens)} over every rank, cached for the current step."""

    def __init__(self, dataset: Dataset, sequences: int, micro_batch: int, world: WorldInfo,
                 collate_fn: Callable[[list], dict[str, torch.Tensor]] = collate):
        self.dataset, self.micro_batch, self.world, self.collate_fn = dataset, micro_batch, world, collate_fn
        self.indices: dict[str, range] = {}
        for name, items in dataset.set_ranges.items():
            part = rank_slice(min(sequences, len(items)), world)
            if len(part):  # the same on every rank: a set with fewer sequences than ranks is left out
                self.indices[name] = range(items.start + part.start, items.start + part.stop)
        self._cached: tuple[int | None, dict[str, tuple[float, int]]] = (None, {})

    @property
    def sets(self) -> list[str]:
        return sorted(self.indices)

    @torch.no_grad()
    def measure(self, engine) -> dict[str, tuple[float, int]]:
        engine.eval()
        local = [token_nll(engine, self.dataset, self.indices[name], self.micro_batch, self.collate_fn)
                 for name in self.sets]
        engine.train()
        totals = all_sum([x for nll in local for x in (nll.total, nll.tokens)], engine.device)
        return {name: (totals[2 * k], int(totals[2 * k + 1])) for k, name in enumerate(self.sets)}

    def __call__(self, engine) -> dict[str, tuple[float, int]]:
        """`measure`, once per optimizer step of a DeepSpeed engine (validation and the mixture share it)."""
        step = getattr(engine, "global_steps", None)
        if step is None or self._cached[0] != step:
            self._cached = (step, self.measure(engine))
        return self._cached[1]

    def losses(self, engine) -> dict[str, float]:
        return {name: nll / tokens for name, (nll, tokens) in self(engine).items()}


class ValidationLoss:
    name = "validation"

    def __init__(self, dataset: Dataset, sequences: int, micro_batch: int, world: WorldInfo, every: int,
                 collate_fn: Callable[[list], dict[str, torch.Tensor]] = collate, per_set: SetLosses | None = None):
        self.every, self.per_set = every, per_set
        self.dataset, self.micro_batch, self.collate_fn = dataset, micro_batch, collate_fn
        self.indices = rank_slice(min(sequences, len(dataset)), world)

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        engine.eval()
        nll = token_nll(engine, self.dataset, self.indices, self.micro_batch, self.collate_fn)
        engine.train()
        nll, tokens = all_sum([nll.total, nll.tokens], engine.device)
        results = {"val.loss": nll / tokens, "val.ppl": math.exp(nll / tokens), "val.tokens": int(tokens)}
        for name, loss in (self.per_set.losses(engine) if self.per_set else {}).items():
            results[f"val.loss.{name}"], results[f"val.ppl.{name}"] = loss, math.exp(loss)
        return results
