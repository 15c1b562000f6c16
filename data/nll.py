"""Token-weighted negative log-likelihood: the one way every stage turns losses into perplexity.

A causal LM's loss is the mean over the tokens it predicts in a batch; batches differ in how many
(ragged masks, a short last batch), so losses are re-weighted by their predicted-token counts and
summed before dividing, never averaged per batch. Pruning scores, the paper's perplexity protocol
and the held-out loss during training all accumulate through `TokenNLL`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label of a position that is not predicted (Hugging Face's convention)


def predicted_tokens(labels: torch.Tensor) -> int:
    """Positions a causal LM predicts: every label after the first of a row that is not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TokenNLL:
    total: float = 0.0
    tokens: int = 0

    def add(self, mean_loss: torch.Tensor | float, labels: torch.Tensor) -> None:
        """Accumulate one batch's mean loss over the tokens `labels` makes it predict."""
        count = predicted_tokens(labels)
        if count:
            self.total += float(mean_loss) * count
            self.tokens += count

    @property
    def mean(self) -> float:
        return self.total / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)
