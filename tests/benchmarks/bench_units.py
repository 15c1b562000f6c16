"""The paper's Table 6 at demo scale: depth pruning by whole blocks against attention and MLP sub-layers.

SmolLM2-135M is pruned by the PPL criterion (the paper's Table 6 criterion; the official calibration
of configs/prune/smollm2_ppl_20.yaml) two ways: `unit=block` at 20% fewer parameters, and
`unit=module` with the same parameter budget as the block run actually removed (its ratio is a
floor), so both models are the same size. Each is then tuned with LoRA on the Alpaca sample
(configs/lora/smollm2_demo.yaml, as the paper's Table 6 models are LoRA-retrained) and evaluated
with configs/eval/demo.yaml: held-out Wikipedia perplexity (128-token segments) and zero-shot
accuracy on the embedded wiki_cloze task; latency is left out. Prints the table and which blocks or
modules each removed.

  python tests/benchmarks/bench_units.py [--out outputs/bench_units] [--no-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.config import load_config  # noqa: E402
from data.embedded import resolve_model  # noqa: E402
from pruning.config import PruneConfig  # noqa: E402
from training.evaluation.config import EvalConfig  # noqa: E402

RECIPE = ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml"


def lora(model: Path, run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, str(ROOT / "launch" / "lora.py"), "--config",
               str(ROOT / "configs" / "lora" / "smollm2_demo.yaml"), f"model={model}", f"output_dir={run_dir}",
               "trust_remote_code=true"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"LoRA on {model} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return run_dir / "merged"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_units")
    parser.add_argument("--no-lora", action="store_true")
    args = parser.parse_args()
    from pruning.run import prune
    from training.evaluation.run import evaluate_models

    out = args.out.resolve()
    block = prune(load_config(PruneConfig, RECIPE, [f"output_dir={out / 'block'}", "overwrite=true"])).report
    module = prune(load_config(PruneConfig, RECIPE, [
        f"output_dir={out / 'module'}", "overwrite=true", "unit=module", "trust_remote_code=true",
        f"target.param_ratio={block['param_reduction']:.9f}"])).report
    models = {"original": Path(resolve_model(block["model"])), "block units": out / "block",
              "module units": out / "module"}
    if not args.no_lora:
        models["block units + LoRA"] = lora(out / "block", out / "lora-block")
        models["module units + LoRA"] = lora(out / "module", out / "lora-module")
    entries = ", ".join(f"{{name: '{name}', path: '{path}'}}" for name, path in models.items())
    results = evaluate_models(load_config(EvalConfig, ROOT / "configs" / "eval" / "demo.yaml", [
        f"models=[{entries}]", f"output_dir={out / 'eval'}", "overwrite=true", "latency.batch_sizes=[]",
        "trust_remote_code=true"]))
    rows = {row["name"]: row for row in json.loads((results / "results.json").read_text())["models"]}
    print("Table 6 at demo scale: SmolLM2-135M, PPL criterion, about 20% of the parameters removed")
    print("| model | params | layers | PPL wiki@128 | wiki_cloze acc (%) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['params'] / 1e6:.1f}M | {row['blocks']} | {row['perplexity']['wiki@128']:.2f} | "
              f"{100 * row['zeroshot']['tasks']['wiki_cloze']['value']:.1f} |")
    print(f"block units removed blocks {block['removed']} ({block['param_reduction']:.1%} of the parameters)")
    print(f"module units removed {module['removed_modules']} ({module['param_reduction']:.1%}); whole layers "
          f"{module['removed']}; attention-only layers left: "
          f"{sum(kinds == ['mlp'] for kinds in module['skipped_sublayers'] or [])}, MLP-only layers left: "
          f"{sum(kinds == ['attn'] for kinds in module['skipped_sublayers'] or [])}")
    print(f"results: {results / 'results.json'}")


if __name__ == "__main__":
    main()
