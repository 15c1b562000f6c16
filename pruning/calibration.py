"""Calibration samples as the paper draws them.

Following the paper's code: visit rows of the corpus in a seeded random order, keep rows with at
least `seq_len` tokens (each row at most once), and take a random `seq_len`-token window of each,
until `num_samples` are found. Text is tokenized without special tokens, so a window is plain text.
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase


class CalibrationError(ValueError):
    """The text source cannot provide the requested calibration samples."""


def sample_calibration(documents: list[str], tokenizer: PreTrainedTokenizerBase, num_samples: int,
                       seq_len: int, seed: int) -> torch.Tensor:
    """A LongTensor [num_samples, seq_len] of token ids, reproducible for a given seed."""
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    samples = []
    long_enough = 0
    for row in order:
        ids = tokenizer(documents[row], add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            continue
        long_enough += 1
        start = rng.randint(0, len(ids) - seq_len)
        samples.append(ids[start:start + seq_len])
        if len(samples) == num_samples:
            return torch.tensor(samples, dtype=torch.long)
    raise CalibrationError(
        f"the calibration text has only {long_enough} documents of at least {seq_len} tokens, but "
        f"{num_samples} samples were requested: use a larger text source, or lower "
        "calibration.num_samples or calibration.seq_len"
    )
