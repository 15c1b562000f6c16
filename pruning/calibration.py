"""Calibration samples drawn exactly as the official code draws them, so that the same rows, seed and
tokenizer give the same token ids. Two samplers, as the official repository has two:

- `sample_calibration` (pruning; shortened-llm src/dataset.py `get_examples`): whole rows, one window each;
- `sample_concatenated` (GPTQ; src/quantize_gptq.py `get_dataset`): windows of the rows joined into one stream.

`sample_calibration`, for each sample: draw a row index with `randint(0, rows - 1)` until the row
is long enough and not drawn before, then a window start with `randint(0, n - seq_len)`; all draws
come from one Python `random` stream seeded with `seed`. Two BOS modes, as in the official scripts:

- `special_tokens` (LLaMA/Vicuna scripts): rows are tokenized with the tokenizer's special tokens,
  so LLaMA's BOS is part of the row, counts towards its length and can start a window.
- `every` (Gemma scripts, `--add_bos_to_every`): rows are tokenized without special tokens and
  every window becomes BOS + its first seq_len - 1 tokens.

Unlike the official loop, which spins forever when too few rows are long enough, we stop with an
error once every row has been seen; this never changes the draws of a run that succeeds.
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from pruning.config import CalibrationBos


class CalibrationError(ValueError):
    """The text source cannot provide the requested calibration samples."""


def sample_calibration(documents: list[str], tokenizer: PreTrainedTokenizerBase, num_samples: int,
                       seq_len: int, seed: int, bos: CalibrationBos = "special_tokens") -> torch.Tensor:
    """A LongTensor [num_samples, seq_len] of token ids; `documents` are the source's rows in order
    (empty rows included: they take part in the draws as in the official code)."""
    _check_bos(tokenizer, bos)
    if not documents:
        raise CalibrationError("the calibration text source has no rows")
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    used: list[int] = []
    samples = []
    for _ in range(num_samples):
        while True:
            row = rng.randint(0, len(documents) - 1)
            if lengths.get(row, seq_len) >= seq_len and row not in used:  # else known to be refused
                ids = tokenizer(documents[row], add_special_tokens=bos == "special_tokens")["input_ids"]
                lengths[row] = len(ids)
                if len(ids) >= seq_len:
                    used.append(row)
                    break
            if len(lengths) == len(documents) and sum(n >= seq_len for n in lengths.values()) <= len(used):
                raise CalibrationError(
                    f"the calibration text has only {len(used)} rows of at least {seq_len} tokens, but "
                    f"{num_samples} samples were requested: use a larger text source, or lower "
                    "calibration.num_samples or calibration.seq_len")
        start = rng.randint(0, len(ids) - seq_len)
        samples.append(_window_with_bos(ids[start:start + seq_len], tokenizer, bos))
    return torch.tensor(samples, dtype=torch.long)


def _check_bos(tokenizer: PreTrainedTokenizerBase, bos: CalibrationBos) -> None:
    if bos == "every" and tokenizer.bos_token_id is None:
        raise CalibrationError("calibration.bos=every needs a tokenizer with a BOS token; this one has none "
                               "(use calibration.bos=special_tokens)")


def _window_with_bos(window: list[int], tokenizer: PreTrainedTokenizerBase, bos: CalibrationBos) -> list[int]:
    return [tokenizer.bos_token_id] + window[:-1] if bos == "every" else window


def sample_concatenated(documents: list[str], tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int,
                        seed: int, bos: CalibrationBos = "special_tokens", max_rows: int = 5000) -> torch.Tensor:
    """A LongTensor [num_samples, seq_len] drawn as the official GPTQ script draws its C4 calibration set:
    the first `max_rows` rows joined with blank lines and tokenized once (`special_tokens`: with the
    tokenizer's special tokens, so LLaMA's BOS starts the stream only), then `num_samples` window starts
    `randint(0, n - seq_len - 1)` from one Python `random` stream seeded with `seed` (the script's
    `set_seed(0)`). Windows may overlap and cross row boundaries, so short rows (C4's) serve as well
    as long ones. `every`: tokenized without special tokens, BOS put before each window."""
    _check_bos(tokenizer, bos)
    text = "\n\n".join(documents[:max_rows])
    ids = tokenizer(text, add_special_tokens=bos == "special_tokens", verbose=False)["input_ids"]
    if len(ids) < seq_len + 1:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens in its first {max_rows} rows, fewer than "
                               f"one window of {seq_len} + 1: use a larger text source or a smaller "
                               "calibration.seq_len")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(num_samples)]
    return torch.tensor([_window_with_bos(ids[s:s + seq_len], tokenizer, bos) for s in starts], dtype=torch.long)
