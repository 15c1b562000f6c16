"""Generation latency and throughput, measured as the paper measures them (after FlexGen).

Given a batch size M and an output length L: the latency T is the time to take the prompts
(12 tokens each) and produce M x L new tokens, generation forced to exactly L tokens (no early
stop at EOS), greedy, with the KV cache; throughput = M L / T. The mean over 20 timed runs after
10 warm-up runs is reported, with the peak GPU memory of the timed runs on a GPU.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROMPT = ("The history of the city begins in the early Middle Ages, when merchants from the coast "
          "settled along the river and built the first stone bridge.")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, input_tokens: int) -> torch.Tensor:
    """Exactly `input_tokens` ids of real text (the prompt repeated as needed)."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    while len(ids) < input_tokens:
        ids = ids + ids
    return torch.tensor(ids[:input_tokens])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 1,
                       input_tokens: int = 12, new_tokens: int = 128, warmup: int = 10, runs: int = 20) -> dict:
    device = next(model.parameters()).device
    inputs = prompt_ids(tokenizer, input_tokens).repeat(batch_size, 1).to(device)
    attention = torch.ones_like(inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                   pad_token_id=pad, attention_mask=attention)
    for _ in range(warmup):
        model.generate(inputs, **options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        _synchronize(device)
        started = time.perf_counter()
        output = model.generate(inputs, **options)
        _synchronize(device)
        times.append(time.perf_counter() - started)
        if output.shape[1] - input_tokens != new_tokens:
            raise RuntimeError(f"generation stopped after {output.shape[1] - input_tokens} of {new_tokens} tokens")
    latency = statistics.fmean(times)
    return {"batch_size": batch_size, "input_tokens": input_tokens, "new_tokens": new_tokens, "warmup": warmup,
            "runs": runs, "latency_s": latency, "latency_stdev_s": statistics.pstdev(times),
            "tokens_per_s": batch_size * new_tokens / latency,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
