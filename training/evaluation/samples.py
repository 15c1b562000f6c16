"""Generation samples (the paper's Table 4): each model's continuation of each prompt, side by side.

Greedy by default, so the table is reproducible; `samples.sampling.do_sample=true` samples as the
official demo (`src/demo.py`: top-k 50, top-p 0.95, temperature 1, a fixed seed per prompt).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.evaluation.config import SamplesSection
from training.evaluation.latency import pad_token_id


@torch.no_grad()
def generate_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, section: SamplesSection
                     ) -> list[dict]:
    """[{prompt, text}]: the new tokens only, decoded without special tokens; generation stops at EOS."""
    device = next(model.parameters()).device
    samples = []
    for prompt in section.prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        torch.manual_seed(section.sampling.seed)
        output = model.generate(**inputs, max_new_tokens=section.max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                                **section.sampling.generate_kwargs())
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": text})
    return samples
