"""The pruning stage end to end: tiny models of every architecture, every criterion, bad input."""

import json
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
def test_every_criterion_on_every_architecture(arch, criterion, tiny_model_dirs, books_path, tmp_path):
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
    assert (out / "block_importance.png").stat().st_size > 1000
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
    ("too little text", ["calibration.seq_len=100000"], CalibrationError, "documents of at least 100000 tokens"),
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
