"""The real model: the pruning stage on SmolLM2-135M, as the demo runs it."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.config import load_config
from pruning.config import PruneConfig
from pruning.run import prune
from pruning.scores import calibration_perplexity
from tests.fixtures import ROOT, SMOLLM2_PPL_20_REMOVED

pytestmark = pytest.mark.slow  # real DeepSpeed launches or the real SmolLM2


def test_embedded_checkpoint_is_a_plain_hf_checkpoint(smollm2_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 6  # a trained model, not random weights (ln 49152 = 10.8)


def test_prune_smollm2_by_ppl_from_the_command_line(tmp_path, smollm2_dir):
    """The demo's pruning: with the official calibration sampler the PPL criterion removes exactly the blocks
    the README shows, and the report's calibration perplexities are what the two models give."""
    out = tmp_path / "pruned"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prune.py"), "--config",
         str(ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml"), f"output_dir={out}"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["removed"] == SMOLLM2_PPL_20_REMOVED and report["num_blocks_after"] == 23
    assert 0.15 < report["param_reduction"] <= 0.2
    assert f"removed blocks {report['removed']}" in result.stdout
    calibration = torch.tensor(report["calibration"]["token_ids"])
    assert calibration.shape == (10, 128)
    for model_dir, ppl in ((smollm2_dir, report["calibration_ppl_before"]), (out, report["calibration_ppl_after"])):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        assert calibration_perplexity(model, calibration) == pytest.approx(ppl, rel=1e-5), model_dir


def test_prune_smollm2_by_taylor_plus(tmp_path, books_path):
    config = load_config(PruneConfig, None, [f"output_dir={tmp_path / 'out'}", "criterion=taylor+",
                                             f"calibration.source={books_path}"])
    result = prune(config)
    assert len(result.removed) == 7
    assert all(4 <= b <= 27 for b in result.removed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 23
