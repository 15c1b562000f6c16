"""Per-GPU memory of a CPT run, estimated before any GPU is asked for (training/memory.py), and the
recommended settings of the recipes.

  python launch/memory.py --config configs/cpt/vicuna7b_ppl_20.yaml [key=value ...] [--gpus 8]
  python launch/memory.py --write      # rewrites the memory notes of configs/cpt/*.yaml and the README table

The model's shape comes from its config.json when the model directory exists; for the recipes, whose
models do not exist yet, from the recipe that writes them (a prune in configs/prune/ with the same
output_dir: its input's shape less the blocks it removes; a CPT run's export: its model's shape), down to
a base model's published shape. The notes and the table are
checked against this script's output by tests/test_memory.py, so they cannot drift from the model.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.cli import run_main  # noqa: E402
from data.config import ConfigError, load_config  # noqa: E402
from training.config import CPTConfig  # noqa: E402

RECIPES = ROOT / "configs" / "cpt"
README = ROOT / "README.md"
NOTE_START, NOTE_END = "# Memory per GPU", "# (end of the memory note)"
TABLE_START, TABLE_END = "<!-- memory table: python launch/memory.py --write -->", "<!-- end of the memory table -->"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)
PAPER_BASES = {"huggyllama/llama-7b": LLAMA_7B, "lmsys/vicuna-7b-v1.3": LLAMA_7B, "lmsys/vicuna-13b-v1.3": LLAMA_13B}
WORLD, PRECISION, ATTENTION = 8, "bf16", "varlen"  # what the recipes are written for: one node of 8 GPUs


@functools.cache
def model_shape(model: str):
    """The ModelShape of a checkpoint directory, a paper base model, or the product of a recipe here."""
    from training.memory import ModelShape

    return ModelShape.from_config(published_config(model))


def published_config(model: str):
    """The model's config: its config.json, a paper base model's published shape, or, for a model a recipe here
    will write, the config of that recipe's input less the blocks a prune removes (configs/prune/, every
    level: the paper's recipes and chains' rounds) or as it was (a CPT run's export, configs/cpt/)."""
    import yaml
    from transformers import AutoConfig, LlamaConfig

    if (Path(model) / "config.json").is_file():
        return AutoConfig.from_pretrained(model)
    if model in PAPER_BASES:
        return LlamaConfig(**PAPER_BASES[model], vocab_size=32000, tie_word_embeddings=False)
    for recipe in sorted((ROOT / "configs" / "prune").rglob("*.yaml")):
        prune = yaml.safe_load(recipe.read_text())
        if prune.get("output_dir") == model and (prune.get("target") or {}).get("num_blocks"):
            config = published_config(prune["model"])
            config.num_hidden_layers -= prune["target"]["num_blocks"]
            return config
    for recipe in sorted(RECIPES.glob("*.yaml")):
        cpt = yaml.safe_load(recipe.read_text())
        if Path(model).parent == Path(cpt["output_dir"]) / "exports":
            return published_config(cpt["model"])
    raise ConfigError(f"model {model}: no config.json there and no recipe in configs/ writes it; point model= at a "
                      "checkpoint directory")


def shapes(config: CPTConfig):
    teacher = model_shape(config.distill.teacher) if config.distill.teacher else None
    return model_shape(config.model), teacher


def settings_text(config: CPTConfig) -> str:
    """The settings memory depends on most, as overrides: zero_stage, micro_batch, activation_checkpointing."""
    checkpointing = config.activation_checkpointing
    return (f"zero_stage={config.zero_stage} micro_batch={config.micro_batch} activation_checkpointing="
            f"{str(checkpointing).lower()}")


def estimate(config: CPTConfig, world_size: int = WORLD):
    from training.memory import estimate_memory, setup_for

    student, teacher = shapes(config)
    return estimate_memory(student, setup_for(config, world_size, PRECISION, ATTENTION, teacher))


def recommend(path: Path, device_bytes: int) -> CPTConfig:
    """A recipe's setting for a GPU: no recomputation before every other block before all, ZeRO-1 before ZeRO-2,
    then the largest micro-batch (at most 8, so that 512 sequences divide over 8 nodes of 8 GPUs), whose
    estimate stays within RECOMMENDED_FRACTION of the GPU's memory."""
    from training.memory import RECOMMENDED_FRACTION

    for checkpointing in ("false", "2", "true"):
        for stage in (1, 2):
            for micro in (8, 4, 2, 1):
                candidate = load_config(CPTConfig, path, [f"zero_stage={stage}", f"micro_batch={micro}",
                                                          f"activation_checkpointing={checkpointing}"])
                if estimate(candidate).total <= RECOMMENDED_FRACTION * device_bytes:
                    return candidate
    raise ConfigError(f"{path} fits no setting on {device_bytes / 2**30:.0f} GiB per GPU: use more GPUs with "
                      "zero_stage=3")


def recipe_note(path: Path) -> list[str]:
    """A recipe's memory note: the recommended setting and its estimate on each GPU the recipes target."""
    from training.memory import GPUS

    config = load_config(CPTConfig, path)
    lines = [f"{NOTE_START}, estimated by training/memory.py for {WORLD} GPUs, {PRECISION}, seq {config.data.seq_len}, "
             f"{ATTENTION} attention",
             "# (python launch/memory.py --config <this file> prints the parts). The fastest setting within 85% of "
             "the GPU:",
             "# no recomputation first, ZeRO-1 before ZeRO-2, then the largest micro-batch; the recipe is the H100's."]
    for gpu, device_bytes in GPUS.items():
        best = recommend(path, device_bytes)
        lines.append(f"#   {gpu}: {settings_text(best)} -> {estimate(best).gib():.1f} of "
                     f"{device_bytes / 2**30:.1f} GiB")
    return lines + [NOTE_END]


def readme_table() -> list[str]:
    from training.memory import GPUS

    h100, h200 = GPUS
    rows = [TABLE_START, f"| recipe | params | {h100}: the recipe | GiB | {h200} | GiB |",
            "| --- | --- | --- | --- | --- | --- |"]
    for path in recipes():
        cells = [re.match(r"#   [^:]+: (.*) -> ([\d.]+) of", line).groups() for line in recipe_note(path)[3:5]]
        params = shapes(load_config(CPTConfig, path))[0].parameters / 1e9
        rows.append(f"| `{path.name}` | {params:.1f}B | `{cells[0][0]}` | {cells[0][1]} | `{cells[1][0]}` | "
                    f"{cells[1][1]} |")
    return rows + [TABLE_END]


def recipes() -> list[Path]:
    return [path for path in sorted(RECIPES.glob("*.yaml")) if path.name != "smollm2_demo.yaml"]


def replace_between(lines: list[str], start: str, end: str, new: list[str]) -> list[str]:
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i, line in enumerate(lines) if line.startswith(end) and i >= first)
    return lines[:first] + new + lines[last + 1:]


def write_notes() -> None:
    for path in recipes():
        lines = replace_between(path.read_text().splitlines(), NOTE_START, NOTE_END, recipe_note(path))
        path.write_text("\n".join(lines) + "\n")
    lines = replace_between(README.read_text().splitlines(), TABLE_START, TABLE_END, readme_table())
    README.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a CPT recipe (configs/cpt/)")
    parser.add_argument("--gpus", type=int, default=WORLD, help="data-parallel GPUs (default 8)")
    parser.add_argument("--write", action="store_true", help="rewrite the recipes' memory notes and the README table")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. micro_batch=4")
    args = parser.parse_args(argv)
    if args.write:
        write_notes()
        return 0
    if args.config is None:
        parser.error("give --config (or --write)")
    config = load_config(CPTConfig, args.config, args.overrides)
    print(f"{settings_text(config)} on {args.gpus} GPUs, {PRECISION}, {ATTENTION}: {estimate(config, args.gpus).describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
