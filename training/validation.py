"""Held-out loss on the data's validation split, a periodic evaluation of the trainer.

The first `sequences` validation sequences (or examples) (rounded down to a multiple of the world size) are
split evenly across ranks, so every rank runs the same number of forward passes (ZeRO-3 gathers
parameters collectively and would hang otherwise). The loss is averaged per predicted token over
all ranks, not per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from data.loader import collate, to_device
from data.nll import TokenNLL
from training.distributed import WorldInfo, all_sum


class ValidationLoss:
    name = "validation"

    def __init__(self, dataset: Dataset, sequences: int, micro_batch: int, world: WorldInfo, every: int,
                 collate_fn: Callable[[list], dict[str, torch.Tensor]] = collate):
        self.every = every
        per_rank = min(sequences, len(dataset)) // world.world_size
        self.dataset, self.micro_batch, self.collate_fn = dataset, micro_batch, collate_fn
        self.indices = list(range(world.rank * per_rank, (world.rank + 1) * per_rank))

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        engine.eval()
        nll = TokenNLL()
        for start in range(0, len(self.indices), self.micro_batch):
            batch = self.collate_fn([self.dataset[i] for i in self.indices[start:start + self.micro_batch]])
            batch = to_device(batch, engine.device)
            nll.add(engine(**batch, use_cache=False).loss, batch["labels"])
        engine.train()
        nll, tokens = all_sum([nll.total, nll.tokens], engine.device)
        return {"val.loss": nll / tokens, "val.ppl": math.exp(nll / tokens), "val.tokens": int(tokens)}
