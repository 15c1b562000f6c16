"""Iterative pruning (prune, distil, prune again): the second prune's blocks in the original model's numbering."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.lineage import LINEAGE_FILE
from pruning.run import prune
from tests.test_prune_run import make_config
from tests.tiny_models import TINY_LAYERS


def report_of(path) -> dict:
    return json.loads((path / "pruning_report.json").read_text())


def test_a_second_prune_reports_and_keeps_the_original_models_blocks(tiny_model_dirs, books_path, tmp_path, capsys):
    from launch.prune import main

    original = tiny_model_dirs["llama"]
    first = prune(make_config(original, tmp_path / "first", books_path, "criterion=mag", "target.num_blocks=null",
                              "target.blocks=[1, 4, 6]", "verify_reload=false"))  # kept: 0, 2, 3, 5, 7
    assert report_of(tmp_path / "first")["removed_original"] == first.removed  # an original: the same numbering
    second = tmp_path / "second"
    assert main([f"model={tmp_path / 'first'}", f"output_dir={second}", f"calibration.source={books_path}",
                 "calibration.num_samples=4", "calibration.seq_len=32", "criterion=ppl", "target.num_blocks=2",
                 "verify_reload=false"]) == 0
    report = report_of(second)
    assert report["original_model"] == str(original) and report["blocks_original"] == first.kept
    assert report["removed_original"] == [first.kept[i] for i in report["removed"]]
    assert report["kept_original"] == [first.kept[i] for i in report["kept"]]
    assert sorted(first.removed + report["removed_original"] + report["kept_original"]) == list(range(TINY_LAYERS))
    assert (f"removed blocks {report['removed_original']} of the original {original} ({report['removed']} in this "
            "checkpoint's numbering)") in capsys.readouterr().out
    lineage = json.loads((second / LINEAGE_FILE).read_text())
    assert lineage["blocks"] == report["kept_original"]
    assert lineage["prunes"] == [{"criterion": "mag", "removed": first.removed},
                                 {"criterion": "ppl", "removed": report["removed_original"]}]
    # the weights say the same: block i of the twice-pruned model is block kept_original[i] of the original
    before = AutoModelForCausalLM.from_pretrained(original).model.layers
    after = AutoModelForCausalLM.from_pretrained(second).model.layers
    for index, original_index in enumerate(report["kept_original"]):
        for (name, tensor), (_, expected) in zip(after[index].state_dict().items(),
                                                 before[original_index].state_dict().items(), strict=True):
            assert torch.equal(tensor, expected), (index, original_index, name)

    # a lineage.json that does not fit its checkpoint is refused before any weights load
    (tmp_path / "first" / LINEAGE_FILE).write_text(json.dumps({**lineage, "blocks": lineage["blocks"][:-1]}))
    with pytest.raises(ValueError, match=f"lists {TINY_LAYERS - 6} blocks but the model has {TINY_LAYERS - 3}"):
        prune(make_config(tmp_path / "first", tmp_path / "third", books_path, "criterion=mag"))
    assert not (tmp_path / "third").exists()


@pytest.mark.slow
def test_the_chain_through_a_top_k_distilled_cpt_export(cpt_inputs, books_path, tmp_path, single_process_group):
    """prune -> distil (top-k, from the unpruned model) -> prune: the CPT export carries the lineage."""
    from tests.test_schedule import steps, train

    first = prune(make_config(cpt_inputs["model"], tmp_path / "round1", books_path, "criterion=ppl",
                              "target.num_blocks=1"))
    run = tmp_path / "distill"
    assert train({"model": tmp_path / "round1", "tokens": cpt_inputs["tokens"]}, run, single_process_group,
                 "train_steps=2", f"distill.teacher={cpt_inputs['model']}", "distill.top_k=8") == "completed"
    logged = steps(run)
    assert all(r["train.kd"] > 0 and 0 < r["train.kd_top_k_mass"] <= 1 for r in logged.values())
    export = run / "exports" / "step_00000002"
    assert (export / LINEAGE_FILE).read_text() == (tmp_path / "round1" / LINEAGE_FILE).read_text()
    second = prune(make_config(export, tmp_path / "round2", books_path, "criterion=ppl", "target.num_blocks=1"))
    report = report_of(tmp_path / "round2")
    assert report["removed_original"] == [first.kept[i] for i in second.removed]
    assert sorted(first.removed + report["removed_original"] + report["kept_original"]) == [0, 1, 2, 3]
