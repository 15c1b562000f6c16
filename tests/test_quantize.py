"""The quantization stage (launch/quantize.py): bad input refused before any model is loaded, sizes read
from disk, nothing left behind by a failure, and (slow) the real SmolLM2 quantized to 4 bits, reloaded
with plain `from_pretrained` and evaluated by launch/eval.py like any model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from data.artifacts import ArtifactExistsError
from data.config import ConfigError, load_config
from data.text import load_documents
from pruning.calibration import sample_concatenated
from tests.fixtures import ROOT
from training.quantization import gptq, run
from training.quantization.config import QuantizeConfig
from training.quantization.sizes import checkpoint_sizes, compare_sizes


def _config(tmp_path: Path, *overrides: str) -> QuantizeConfig:
    return load_config(QuantizeConfig, None, [f"output_dir={tmp_path / 'out'}", *overrides])


@pytest.mark.parametrize("override, message", [
    ("bits=5", "GPTQ checkpoints hold 2, 3, 4, 8-bit weights"),
    ("group_size=0", "positive number of columns"),
    ("damp_percent=1.5", "between 0 and 1"),
    ("damp_auto_increment=-0.1", "0 \\(no retries\\) or more"),
    ("calibration.sampler=random", "is not one of 'concat', 'rows'"),
    ("calibration.max_rows=0", "calibration.max_rows must be at least 1"),
    ("calibration.seq_len=1", "calibration.seq_len must be at least 2"),
])
def test_bad_settings_are_refused_with_the_fix(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, override)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Refusals must come before any weights are read: loading a model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(run.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(gptq, "quantize_checkpoint", refuse)


def test_bad_input_is_refused_before_any_model_is_loaded(tmp_path, tiny_model_dirs, no_model_loading, monkeypatch):
    tiny = tiny_model_dirs["llama"]  # hidden size 64, MLP 128
    cases = [
        (["model=/no/such/checkpoint"], ConfigError, "not a Hugging Face checkpoint directory"),
        ([f"model={tmp_path}"], ConfigError, "no config.json"),
        (["model=no-such-org/no-such-model"], ConfigError, "neither a local checkpoint directory nor a hub model"),
        ([f"model={tiny}"], ConfigError, "group_size=128 does not divide the input width 64 of model.layers.0."
                                         "self_attn.q_proj \\(and 47 more layers\\).* Use group_size=64"),
        ([f"model={tiny}", "group_size=32", "calibration.source=/no/such/text.jsonl"], ValueError, "does not exist"),
        ([f"model={tiny}", "group_size=32", "calibration.sampler=rows", "calibration.num_samples=20"], ValueError,
         "lower calibration.num_samples or calibration.seq_len"),  # the 300 C4 rows have 13 of 2048 tokens
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            run.quantize(_config(tmp_path, *overrides))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    with pytest.raises(ArtifactExistsError, match="set overwrite=true"):
        run.quantize(_config(tmp_path, f"model={tiny}"))
    real_find_spec = gptq.importlib.util.find_spec
    monkeypatch.setattr(gptq.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real_find_spec(name, *a))
    with pytest.raises(gptq.QuantizationLibraryError, match="GPTQ needs gptqmodel, not installed here: make install"):
        run.quantize(_config(tmp_path, f"model={tiny}", "group_size=32", "overwrite=true"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"  # nothing already written is lost


def test_a_failed_quantization_leaves_nothing_behind(tmp_path, tiny_model_dirs, monkeypatch):
    def fail_halfway(model_path, calibration, config, device, dtype, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half a checkpoint")
        raise RuntimeError("killed while quantizing")

    monkeypatch.setattr(gptq, "quantize_checkpoint", fail_halfway)
    with pytest.raises(RuntimeError, match="killed while quantizing"):
        run.quantize(_config(tmp_path, f"model={tiny_model_dirs['llama']}", "group_size=32", "calibration.num_samples=2",
                             "calibration.seq_len=32", "device=cpu"))
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_cli_refuses_a_missing_model_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "quantize.py"), "model=/no/such/checkpoint",
                             f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model /no/such/checkpoint: /no/such/checkpoint is not a Hugging Face checkpoint directory (no "
        "config.json); give the directory written by launch/prune.py, launch/cpt.py (exports/) or launch/lora.py "
        "(merged/)"]
    assert not (tmp_path / "out").exists()


def test_sizes_are_read_from_the_safetensors_headers(tmp_path):
    """A 256 x 128 fp32 layer against its 4-bit GPTQ form with one group of 128: the bytes the report gives
    are those of the tensors and files written."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    dense = {"model.layers.0.mlp.up_proj.weight": torch.randn(256, 128), "model.norm.weight": torch.ones(128)}
    gptq_layer = {"model.layers.0.mlp.up_proj.qweight": torch.zeros(16, 256, dtype=torch.int32),
                  "model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 32, dtype=torch.int32),
                  "model.layers.0.mlp.up_proj.scales": torch.zeros(1, 256, dtype=torch.float16),
                  "model.layers.0.mlp.up_proj.g_idx": torch.zeros(128, dtype=torch.int32),
                  "model.norm.weight": torch.ones(128)}
    save_file(dense, before / "model.safetensors")
    save_file(gptq_layer, after / "model.safetensors")
    (after / "config.json").write_text("{}")
    sizes = compare_sizes(before, after)
    nbytes = {name: sum(t.numel() * t.element_size() for t in tensors.values())
              for name, tensors in (("before", dense), ("after", gptq_layer))}
    assert sizes["before"] == {"disk_bytes": (before / "model.safetensors").stat().st_size,
                               "weight_bytes": nbytes["before"]}
    assert sizes["after"] == checkpoint_sizes(after)
    assert sizes["after"]["disk_bytes"] == sum(f.stat().st_size for f in after.iterdir())
    assert sizes["after"]["weight_bytes"] == nbytes["after"]
    layers = sizes["quantized_layers"]
    assert layers == {"count": 1, "weights": 256 * 128, "bytes_before": 256 * 128 * 4,
                      "bytes_after": nbytes["after"] - 128 * 4,
                      "bits_per_weight_after": 8 * (nbytes["after"] - 128 * 4) / (256 * 128)}
    assert 4 < layers["bits_per_weight_after"] < 5  # 4 bits + scales, zeros, g_idx


def _tensor_bytes(directory: Path) -> int:
    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    return total


@pytest.mark.slow
def test_smollm2_in_4_bits_reloads_and_evaluates_like_any_model(tmp_path, smollm2_dir, tokenizer):
    """The real SmolLM2-135M through launch/quantize.py (a small calibration set: 8 C4 windows of 256 tokens),
    its report checked against the files written, then launch/eval.py on it beside the original."""
    out = tmp_path / "gptq"
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "quantize.py"), "--config",
                             str(ROOT / "configs" / "quantize" / "smollm2_demo.yaml"), f"output_dir={out}",
                             "calibration.num_samples=8", "calibration.seq_len=256"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "210 linear layers to 4-bit GPTQ" in result.stdout  # 30 blocks x 7 projections
    assert not (tmp_path / "logs").exists()  # GPTQModel's per-module log is not left in the working directory

    report = json.loads((out / "quantization_report.json").read_text())
    assert report["library"]["quantizer"] == f"gptqmodel {importlib.metadata.version('gptqmodel')}"
    assert report["versions"]["optimum"] == importlib.metadata.version("optimum")
    assert report["settings"] == {"bits": 4, "group_size": 64, "desc_act": True, "sym": True, "damp_percent": 0.01,
                                  "damp_auto_increment": 0.01, "true_sequential": True, "static_groups": False,
                                  "act_group_aware": False, "fallback": None, "format": "gptq"}
    quantization_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: quantization_config[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True}
    documents = load_documents("embedded:c4_demo.jsonl", keep_empty=True)
    calibration = sample_concatenated(documents, tokenizer, 8, 256, seed=0)
    assert report["calibration"]["fingerprint"] == hashlib.sha256(calibration.numpy().tobytes()).hexdigest()
    assert report["calibration"]["tokens"] == 8 * 256
    ours = {"quantization_report.json", "quantization_config.yaml"}  # written after the sizes were taken
    sizes = report["sizes"]
    assert sizes["before"] == {"disk_bytes": sum(f.stat().st_size for f in smollm2_dir.iterdir() if f.is_file()),
                               "weight_bytes": _tensor_bytes(smollm2_dir)}
    assert sizes["after"] == {"disk_bytes": sum(f.stat().st_size for f in out.iterdir() if f.name not in ours),
                              "weight_bytes": _tensor_bytes(out)}
    layers = sizes["quantized_layers"]
    with safe_open(smollm2_dir / "model.safetensors", "pt") as handle:
        projections = [k for k in handle.keys() if k.startswith("model.layers.") and k.endswith("_proj.weight")]
        assert layers["weights"] == sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1]
                                        for k in projections)
    assert layers["count"] == len(projections) == 210
    assert 4 < layers["bits_per_weight_after"] < 5 and layers["bytes_after"] < layers["bytes_before"] / 6
    ppl = report["calibration_ppl"]
    assert 1 < ppl["before"] < ppl["after"] < 2 * ppl["before"], ppl
    saved = yaml.safe_load((out / "quantization_config.yaml").read_text())
    assert saved["calibration"]["num_samples"] == 8 and saved["output_dir"] == str(out)

    evaluation = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "eval.py"), "--config", str(ROOT / "configs" / "eval" / "demo.yaml"),
         f"output_dir={tmp_path / 'eval'}", "zeroshot.limit=20", "perplexity.max_segments=8", "latency.warmup=0",
         "latency.runs=1", "latency.new_tokens=[8]",
         f"models=[{{name: original, path: {smollm2_dir}}}, {{name: gptq4, path: {out}}}]"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    original, quantized = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]
    assert quantized["blocks"] == original["blocks"] == 30
    assert quantized["params"] == original["params"]  # a packed GPTQ layer counts the weights it stands for
    ppl_original, ppl_quantized = original["perplexity"]["wiki@128"], quantized["perplexity"]["wiki@128"]
    assert math.isfinite(ppl_quantized) and ppl_original < ppl_quantized < 2 * ppl_original
    assert quantized["zeroshot"]["average"] > 0.5  # 4 choices: chance is 0.25; the original scores ~0.9
    assert quantized["latency"][0]["tokens_per_s"] > 0
    assert "| gptq4 |" in (tmp_path / "eval" / "results.md").read_text()
