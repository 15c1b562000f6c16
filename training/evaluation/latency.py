"""Generation latency, throughput and peak memory of one cell (batch size M, output length L),
measured as the paper and its official `gen_batch_eval_time.py` measure them (after FlexGen).

The latency T is the time to take M prompts of 12 tokens and produce M x L new tokens, generation
forced to exactly L tokens (no early stop at EOS), with the KV cache; by default sampling with
top-k 50, top-p 0.95 and temperature 1 from seed 1234, as the official script (`sampling.do_sample=false`:
greedy). Reported: the mean and standard deviation of T over the timed runs after the warm-up runs,
the throughput as the mean of M L / T over those runs (the official script's `th_mean`), and the peak
memory of the cell (see memory.py). A cell that runs out of memory returns status "oom" instead of
raising.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.evaluation.config import OFFICIAL_PROMPT, SamplingSection
from training.evaluation.memory import GIB, MemoryMeter, kv_cache_bytes


def prompt_ids(tokenizer: PreTrainedTokenizerBase, input_tokens: int | None, prompt: str = OFFICIAL_PROMPT
               ) -> torch.Tensor:
    """The prompt as the tokenizer encodes it (special tokens included, as the official script), then
    repeated or cut to exactly `input_tokens` ids when that is set."""
    ids = tokenizer(prompt)["input_ids"]
    if input_tokens is not None:
        body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        while len(ids) < input_tokens:
            ids = ids + body
        ids = ids[:input_tokens]
    return torch.tensor(ids)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 1,
                       input_tokens: int | None = 12, new_tokens: int = 128, warmup: int = 10, runs: int = 20, *,
                       prompt: str = OFFICIAL_PROMPT, sampling: SamplingSection | None = None,
                       meter: MemoryMeter | None = None) -> dict:
    """One cell; `sampling=None` is greedy, `meter=None` measures memory on the model's device, no limit."""
    device = next(model.parameters()).device
    meter = meter or MemoryMeter(device)
    sampling = sampling or SamplingSection(do_sample=False)
    inputs = prompt_ids(tokenizer, input_tokens, prompt).repeat(batch_size, 1).to(device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                   pad_token_id=pad_token_id(tokenizer), attention_mask=torch.ones_like(inputs),
                   **sampling.generate_kwargs())
    cell = {"batch_size": batch_size, "input_tokens": inputs.shape[1], "new_tokens": new_tokens, "warmup": warmup,
            "runs": runs, "do_sample": sampling.do_sample, "memory": meter.kind}
    needed = kv_cache_bytes(model.config, batch_size, inputs.shape[1] + new_tokens - 1,
                            model.get_input_embeddings().weight.dtype)
    torch.manual_seed(sampling.seed)
    times = []
    try:
        meter.reset()
        meter.check(needed)
        for run in range(warmup + runs):
            _synchronize(device)
            started = time.perf_counter()
            output = model.generate(inputs, **options)
            _synchronize(device)
            if run >= warmup:
                times.append(time.perf_counter() - started)
            meter.check()
            if output.shape[1] - inputs.shape[1] != new_tokens:
                raise RuntimeError(f"generation stopped after {output.shape[1] - inputs.shape[1]} of {new_tokens} tokens")
    except torch.OutOfMemoryError as err:
        reason = str(err).splitlines()[0][:300]
    else:
        peak = meter.peak()
        return {**cell, "status": "ok", "latency_s": statistics.fmean(times),
                "latency_stdev_s": statistics.pstdev(times),
                "tokens_per_s": statistics.fmean(batch_size * new_tokens / t for t in times), "times_s": times,
                "peak_memory_gb": None if peak is None else peak / GIB}
    meter.release()
    return {**cell, "status": "oom", "oom": reason}
