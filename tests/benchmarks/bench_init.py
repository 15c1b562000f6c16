"""The paper's Figure 5 at demo scale: continued pretraining from the pruned network against the same
architecture from random initialisation.

SmolLM2-135M is pruned by PPL to 20% fewer parameters (configs/prune/smollm2_ppl_20.yaml), the demo
corpus is tokenized with its tokenizer (configs/data/demo.yaml), and two CPT runs follow with the same
data, order, steps, batch and optimizer (configs/cpt/smollm2_demo.yaml: 2 DeepSpeed processes on the
CPU, 4 sequences of 256 tokens per step, AdamW lr 1e-4): `init=pretrained` starts from the pruned
weights, `init=random` from the model's own `_init_weights` with seed 1234. The held-out loss on the
data's validation split (16 sequences) is logged every `--every` steps. Prints the table and writes
init_curves.png (held-out loss per step, both runs) to --out.

  python tests/benchmarks/bench_init.py [--steps 30] [--every 5] [--out outputs/bench_init] [--pruned DIR]

`--pruned` takes that pruned checkpoint instead of pruning again (e.g. bench_units.py's block run,
the same recipe).
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
from data.prepare import PrepareConfig, prepare  # noqa: E402
from pruning.config import PruneConfig  # noqa: E402
from training.distributed import free_port  # noqa: E402

INITS = ("pretrained", "random")


def cpt(model: Path, tokens: Path, run_dir: Path, init: str, steps: int, every: int) -> dict[int, float]:
    """One CPT run under the deepspeed launcher; its held-out loss per validation step."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "launch" / "cpt.py"), "--config", str(ROOT / "configs" / "cpt" / "smollm2_demo.yaml"),
               f"model={model}", f"data.path={tokens}", f"output_dir={run_dir}", f"init={init}",
               f"train_steps={steps}", f"validation.every_steps={every}", "zeroshot.every_steps=0",
               "checkpoint.every_steps=0", "checkpoint.export_at_end=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"CPT init={init} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val.loss"] for r in records if "val.loss" in r}


def plot(curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for (init, curve), color in zip(curves.items(), ("tab:blue", "tab:purple"), strict=True):
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], marker="o", color=color,
                label="pruned network (init=pretrained)" if init == "pretrained" else "random init (init=random)")
    ax.set_xlabel("CPT step (4 sequences x 256 tokens)")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M pruned 20% (PPL): CPT from the pruned weights vs from scratch", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_init")
    parser.add_argument("--pruned", type=Path, default=None)
    args = parser.parse_args()
    from pruning.run import prune

    out = args.out.resolve()
    pruned = args.pruned.resolve() if args.pruned else out / "pruned-ppl-20"
    if args.pruned is None:
        prune(load_config(PruneConfig, ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml",
                          [f"output_dir={pruned}", "overwrite=true"]))
    tokens = out / "tokens"
    prepare(load_config(PrepareConfig, ROOT / "configs" / "data" / "demo.yaml",
                        [f"tokenizer={pruned}", f"output_dir={tokens}", "overwrite=true"]))
    curves = {init: cpt(pruned, tokens, out / f"cpt-{init}", init, args.steps, args.every) for init in INITS}
    plot(curves, out / "init_curves.png")
    print(f"Held-out loss (validation split of configs/data/demo.yaml, 16 x 256 tokens), {args.steps} CPT steps")
    print("| step | pruned init | random init |")
    print("|---|---|---|")
    for step in sorted(curves["pretrained"]):
        print(f"| {step} | {curves['pretrained'][step]:.3f} | {curves['random'][step]:.3f} |")
    print(f"figure: {out / 'init_curves.png'}")


if __name__ == "__main__":
    main()
