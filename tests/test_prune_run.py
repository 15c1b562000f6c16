"""The pruning stage end to end: tiny models of every architecture, every criterion, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from data.artifacts import ArtifactExistsError
from data.config import ConfigError, load_config
from pruning.calibration import CalibrationError
from pruning.config import CRITERIA, PruneConfig
from pruning.layers import LayersNotFoundError
from pruning.run import ModelLoadError, prune
from pruning.selection import TargetError
from tests.fixtures import ROOT
from tests.tiny_models import ARCHITECTURES, TINY_LAYERS, FlatConfig, FlatModel


def make_config(model_dir, out, books_path, *overrides):
    return load_config(PruneConfig, None, [
        f"model={model_dir}", f"output_dir={out}", f"calibration.source={books_path}",
        "calibration.num_samples=4", "calibration.seq_len=32", "target.param_ratio=null",
        "target.num_blocks=2", *overrides])


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_on_every_architecture(arch, criterion, tiny_model_dirs, books_path, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn, bar = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, height, **kw: drawn.append((list(x), list(height), kw["color"]))
                        or bar(self, x, height, **kw))
    out = tmp_path / "pruned"
    result = prune(make_config(tiny_model_dirs[arch], out, books_path, f"criterion={criterion}",
                               "verify_reload=false"))
    report = json.loads((out / "pruning_report.json").read_text())
    assert len(report["scores"]) == TINY_LAYERS and len(result.removed) == 2
    assert sorted(report["removed"] + report["kept"]) == list(range(TINY_LAYERS))
    if criterion.endswith("+"):
        assert report["protected"] == [0, 1, 2, 3, TINY_LAYERS - 2, TINY_LAYERS - 1]
        assert not set(report["removed"]) & set(report["protected"])
    else:
        assert report["protected"] == []
        candidates = sorted(range(TINY_LAYERS), key=lambda i: (report["scores"][i], i))
        assert report["removed"] == sorted(candidates[:2])
    # the picture: one bar per block at its score, removed blocks red, protected gray (the paper's Figure 4)
    colors = ["tab:red" if i in report["removed"] else "tab:gray" if i in report["protected"] else "tab:blue"
              for i in range(TINY_LAYERS)]
    assert drawn == [(list(range(TINY_LAYERS)), report["scores"], colors)]
    import matplotlib.image

    assert matplotlib.image.imread(out / "block_importance.png").shape[:2] == (432, 720)  # 6 x 3.6 in at 120 dpi
    assert AutoConfig.from_pretrained(out).num_hidden_layers == TINY_LAYERS - 2


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_output_reloads_with_plain_transformers_and_generates(arch, tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    result = prune(make_config(tiny_model_dirs[arch], out, books_path, "criterion=ppl", "iterative=true"))
    report = json.loads((out / "pruning_report.json").read_text())
    assert len(report["removal_order"]) == 2 and sorted(report["removal_order"]) == result.removed
    assert report["params_after"] < report["params_before"]
    assert len(report["calibration"]["token_ids"]) == 4 and report["fingerprints"]["model"]
    assert {"torch", "transformers"} <= set(report["versions"])
    assert (out / "prune_config.yaml").exists() and (out / "tokenizer.json").exists()

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).eval()
    from pruning.layers import remove_blocks

    remove_blocks(original, result.removed)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([report["calibration"]["token_ids"][0][:8]])
    with torch.no_grad():
        expected = original.generate(prompt, max_new_tokens=12, do_sample=False)
        got = reloaded.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(expected, got)


def test_param_ratio_sets_the_block_count(tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    config = make_config(tiny_model_dirs["llama"], out, books_path, "target.num_blocks=null",
                         "target.param_ratio=0.012", "criterion=mag")
    report = prune(config).report
    per_block = (report["params_before"] - report["params_after"]) / len(report["removed"])
    assert len(report["removed"]) == int(0.012 * report["params_before"] // per_block)
    assert len(report["removed"]) == 2 and report["param_reduction"] <= 0.012


def test_explicit_blocks(tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    result = prune(make_config(tiny_model_dirs["llama"], out, books_path, "target.num_blocks=null",
                               "target.blocks=[5,2]", "criterion=mag"))
    assert result.removed == [2, 5]


# --- bad input: a clear error before any expensive work, nothing written -----------------------

@pytest.fixture
def flat_model_dir(tmp_path):
    AutoConfig.register("shorten-flat-test", FlatConfig, exist_ok=True)
    AutoModelForCausalLM.register(FlatConfig, FlatModel, exist_ok=True)
    path = tmp_path / "flat"
    FlatModel(FlatConfig()).save_pretrained(path)
    return path


@pytest.mark.parametrize("case, overrides, error, message", [
    ("all blocks", ["target.num_blocks=8"], TargetError, "at least one block must remain"),
    ("protected", ["criterion=taylor+", "target.num_blocks=3"], TargetError, "only 2 of 8 are not protected"),
    ("protected explicit", ["criterion=mag+", "target.num_blocks=null", "target.blocks=[1,4]"], TargetError,
     r"target.blocks \[1\] are protected"),
    ("too little text", ["calibration.seq_len=100000"], CalibrationError, "rows of at least 100000 tokens"),
    ("tiny ratio", ["target.num_blocks=null", "target.param_ratio=0.001"], TargetError, "less than one block"),
])
def test_bad_input_fails_early_and_writes_nothing(case, overrides, error, message, tiny_model_dirs,
                                                  books_path, tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded before the input was checked"))
    with pytest.raises(error, match=message):
        prune(make_config(tiny_model_dirs["llama"], out, books_path, *overrides))
    assert_nothing_written(out)


def test_missing_model_path(books_path, tmp_path):
    out = tmp_path / "pruned"
    with pytest.raises(ModelLoadError, match="does not exist"):
        prune(make_config(tmp_path / "no-such-model", out, books_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot read a model config"):
        prune(make_config(empty, out, books_path))
    assert_nothing_written(out)


def test_model_without_layers(flat_model_dir, books_path, tmp_path):
    out = tmp_path / "pruned"
    with pytest.raises(LayersNotFoundError, match="could not find the decoder layers"):
        prune(make_config(flat_model_dir, out, books_path))
    assert_nothing_written(out)


def test_existing_output_is_refused_and_untouched(tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactExistsError, match="overwrite=true"):
        prune(make_config(tiny_model_dirs["llama"], out, books_path))
    assert (out / "keep.txt").read_text() == "precious"
    prune(make_config(tiny_model_dirs["llama"], out, books_path, "overwrite=true", "criterion=mag"))
    assert not (out / "keep.txt").exists() and (out / "pruning_report.json").exists()


def test_failure_while_writing_leaves_nothing(tiny_model_dirs, books_path, tmp_path, monkeypatch):
    out = tmp_path / "pruned"

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pruning.run.plot_block_importance", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        prune(make_config(tiny_model_dirs["llama"], out, books_path, "criterion=mag"))
    assert_nothing_written(out)


def test_unknown_criterion_and_missing_text(tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    with pytest.raises(ConfigError, match="criterion"):
        make_config(tiny_model_dirs["llama"], out, books_path, "criterion=random")
    from data.text import TextSourceError

    with pytest.raises(TextSourceError, match="does not exist"):
        prune(make_config(tiny_model_dirs["llama"], out, tmp_path / "none.jsonl"))
    assert_nothing_written(out)


def test_cli_reports_user_errors_without_traceback(tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prune.py"), f"model={tiny_model_dirs['llama']}",
         f"output_dir={out}", f"calibration.source={books_path}", "target.param_ratio=null",
         "target.num_blocks=99"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: cannot remove 99 blocks" in result.stderr and "Traceback" not in result.stderr
    assert_nothing_written(out)


PAPER_RECIPES = sorted((ROOT / "configs" / "prune" / "paper").glob("*.yaml"))
LLAMA_SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
                "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)}


@pytest.fixture(scope="module")
def llama_config_dirs(tmp_path_factory) -> dict[str, Path]:
    """config.json of LLaMA-7B and -13B (no weights): what a dry run reads."""
    from transformers import LlamaConfig

    dirs = {}
    for size, shape in LLAMA_SHAPES.items():
        path = tmp_path_factory.mktemp(f"llama{size}")
        LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **shape).save_pretrained(path)
        dirs[size] = path
    return dirs


def _header(recipe: Path) -> tuple[int, str, int]:
    """Blocks removed, parameters after ('5.5B') and blocks kept, as the recipe's first line states them."""
    first = recipe.read_text().splitlines()[0]
    params, kept, total = re.search(r"\((\d+\.\d)B parameters, (\d+) of (\d+) blocks\)", first).groups()
    return int(total) - int(kept), params, int(kept)


def test_paper_recipes_cover_tables_2_3_and_14():
    names = {p.stem for p in PAPER_RECIPES}
    for model, ratios in (("llama7b", (20, 27, 35)), ("vicuna7b", (20, 27, 35)), ("vicuna13b", (21, 29, 37))):
        assert {f"{model}_{crit}_{r}" for r in ratios for crit in ("ppl", "taylorplus")} <= names
    assert {f"vicuna7b_ppl_{r}" for r in (45, 60, 80)} <= names


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipe_dry_run_gives_the_papers_blocks(recipe, llama_config_dirs):
    from pruning.run import dry_run

    size = "13b" if "13b" in recipe.stem else "7b"
    config = load_config(PruneConfig, recipe, [f"model={llama_config_dirs[size]}", "dry_run=true"])
    plan = dry_run(config)
    removed, params, kept = _header(recipe)
    assert config.target.num_blocks == removed and plan.num_remove == removed
    assert plan.num_blocks - plan.num_remove == kept
    assert f"{plan.params_after / 1e9:.1f}" == params  # Table 14's parameter counts
    assert plan.protected == [0, 1, 2, 3, plan.num_blocks - 2, plan.num_blocks - 1]  # as the official block_prune.py
    assert config.calibration.bos == "special_tokens" and config.calibration.seed == 1234
    assert config.dtype == ("fp16" if config.base_criterion == "ppl" else "fp32")


@pytest.mark.slow
def test_dry_run_from_the_command_line_loads_no_weights(llama_config_dirs, tmp_path):
    out = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prune.py"), "--config",
         str(ROOT / "configs" / "prune" / "paper" / "vicuna13b_ppl_37.yaml"),
         f"model={llama_config_dirs['13b']}", f"output_dir={out}", "dry_run=true"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "would remove 15 blocks -> 25 blocks" in result.stdout
    before, after = re.search(r"parameters: (\d+\.\d+)B -> (\d+\.\d+)B", result.stdout).groups()
    assert round(float(before), 1) == 13.0 and round(float(after), 1) == 8.3  # the paper's Vicuna-13B sizes
    assert not out.exists()


def test_param_ratio_is_a_floor_that_reports_what_it_removes(llama_config_dirs):
    """Our ratio rule is not the paper's: at 45% it removes 14 LLaMA-7B blocks where the paper removes 15."""
    from pruning.run import dry_run

    config = load_config(PruneConfig, None, [f"model={llama_config_dirs['7b']}", "target.param_ratio=0.45"])
    plan = dry_run(config)
    assert plan.num_remove == 14 and 1 - plan.params_after / plan.params_before <= 0.45


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "cpt").glob("*_ppl_*.yaml")), ids=lambda p: p.stem)
def test_cpt_recipes_name_the_prune_recipe_they_continue(recipe):
    import yaml

    named = re.search(r"Continues (configs/prune/paper/\S+\.yaml)", recipe.read_text()).group(1)
    prune_recipe = yaml.safe_load((ROOT / named).read_text())
    assert yaml.safe_load(recipe.read_text())["model"] == prune_recipe["output_dir"]
