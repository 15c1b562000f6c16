"""Benchmark: does distilling from the unpruned model pay, at equal CPT steps and tokens?

SmolLM2-135M is pruned by the PPL criterion to 20% fewer parameters (configs/prune/smollm2_ppl_20.yaml,
the demo's), the demo corpus is tokenized with its tokenizer (configs/data/demo.yaml: C4 sample and
Gutenberg books; wiki_demo.txt stays held out), and two CPT runs start from the same pruned weights
with the same seed, data order, steps and tokens (configs/cpt/smollm2_demo.yaml with `--steps`
steps, zero-shot off): plain next-token CE, and distillation from the unpruned SmolLM2
(`distill.teacher`, Minitron's defaults: logit KL only, T=1). Both run as 2 DeepSpeed CPU processes.
Reported for the pruned model before CPT and after each run: held-out wiki perplexity (the paper's
128-token protocol) and the wiki_cloze accuracy (lm-eval), plus the step-time ratio distilled/plain
measured side by side in this run. Reported as measured, whichever way it comes out; nothing is
asserted. Takes ~10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.config import load_config  # noqa: E402
from data.embedded import resolve_model  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from pruning.config import PruneConfig  # noqa: E402


def cpt(pruned: Path, tokens: Path, run_dir: Path, steps: int, *extra: str) -> Path:
    from training.distributed import free_port

    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "launch" / "cpt.py"), "--config", str(ROOT / "configs" / "cpt" / "smollm2_demo.yaml"),
               f"model={pruned}", f"data.path={tokens}", f"output_dir={run_dir}", f"train_steps={steps}",
               "zeroshot.every_steps=0", f"validation.every_steps={steps}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"CPT failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return sorted((run_dir / "exports").iterdir())[-1]


def step_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["perf.step_s"] for r in records if "perf.step_s" in r and r["step"] > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from pruning.run import prune
    from training.evaluation.config import EvalConfig
    from training.evaluation.run import evaluate_models

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        root = Path(scratch)
        pruned = root / "pruned"
        prune(load_config(PruneConfig, ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml", [f"output_dir={pruned}"]))
        tokens = root / "tokens"
        prepare(load_config(PrepareConfig, ROOT / "configs" / "data" / "demo.yaml",
                            [f"tokenizer={pruned}", f"output_dir={tokens}"]))
        teacher = resolve_model("embedded:smollm2-135m")
        plain = cpt(pruned, tokens, root / "plain", args.steps)
        distilled = cpt(pruned, tokens, root / "distilled", args.steps, f"distill.teacher={teacher}")
        models = {"pruned (PPL, 20%)": pruned, f"+ CPT {args.steps} steps": plain,
                  f"+ CPT {args.steps} steps, distilled": distilled}
        entries = ", ".join(f"{{name: '{name}', path: '{path}'}}" for name, path in models.items())
        results = evaluate_models(load_config(EvalConfig, ROOT / "configs" / "eval" / "demo.yaml",
                                              [f"models=[{entries}]", f"output_dir={root / 'eval'}",
                                               "latency.batch_sizes=[]"]))
        print((results / "results.md").read_text())
        plain_s, distilled_s = step_seconds(root / "plain"), step_seconds(root / "distilled")
        print(f"step time (median, 2 CPU ranks): plain {plain_s:.2f} s, distilled {distilled_s:.2f} s, "
              f"ratio {distilled_s / plain_s:.2f}x (teacher forward: 30 blocks vs the student's 23)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
