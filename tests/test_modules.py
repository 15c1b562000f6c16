"""Module-level depth pruning (unit=module): attention and MLP sub-layers as units, their scores, and the
checkpoint that carries its own modeling code, on tiny models of every architecture."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from data.config import ConfigError, load_config
from data.model_code import check_trust_remote_code, model_code_files
from pruning.checkpoint_code import MODELING_FILE, write_model_code
from pruning.config import PruneConfig
from pruning.layers import find_decoder_layers
from pruning.modules import (
    all_units,
    find_sublayer_modules,
    rebuild_without_units,
    remove_units,
    unit_parameter_counts,
    unit_weights,
)
from pruning.run import prune
from pruning.scores import (
    calibration_perplexity,
    iterative_module_order,
    magnitude_scores,
    module_ppl_scores,
    taylor_scores,
)
from pruning.selection import ModuleTarget, TargetError
from pruning.sublayers import SkippedAttention, SkippedMLP
from tests.tiny_models import TINY_LAYERS, make_tiny_model

# layer 0 loses its attention (the cache's length is read there), 3 goes whole, 5 loses its MLP
UNITS = [(0, "attn"), (3, "attn"), (3, "mlp"), (5, "mlp")]


@pytest.fixture(scope="module")
def tiny_calibration(calibration):
    return calibration % 300


def save_pruned(model, units, path):
    modules = find_sublayer_modules(model)
    remove_units(model, units, modules)
    model.save_pretrained(path)
    return write_model_code(path, model)


@pytest.mark.parametrize("arch, attn_norms, mlp_norms", [
    ("llama", ["input_layernorm"], ["post_attention_layernorm"]),
    ("gemma2", ["input_layernorm", "post_attention_layernorm"], ["post_feedforward_layernorm",
                                                                 "pre_feedforward_layernorm"]),
])
def test_each_unit_owns_its_sub_layer_and_the_norms_around_it(arch, attn_norms, mlp_norms):
    model = make_tiny_model(arch, 300)
    modules = find_sublayer_modules(model)
    assert modules == {"layers": "model.layers", "attn": ["self_attn", *attn_norms], "mlp": ["mlp", *mlp_norms]}
    sizes = unit_parameter_counts(model, modules)
    block = model.model.layers[0]
    assert sizes[(0, "attn")] + sizes[(0, "mlp")] == sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("arch, batch_size", [("llama", 3), ("gemma2", 4)])  # gemma2: norms around each sub-layer
def test_module_ppl_equals_a_rebuild_without_the_module(arch, batch_size, tiny_calibration):
    model = make_tiny_model(arch, 300)
    modules = find_sublayer_modules(model)
    units = all_units(TINY_LAYERS)
    fast = module_ppl_scores(model, tiny_calibration, modules, batch_size=batch_size, progress=False)
    assert len({round(s, 3) for s in fast}) > TINY_LAYERS  # the units really differ
    for unit in [(0, "attn"), (0, "mlp"), (5, "mlp"), (7, "attn")]:
        rebuilt = rebuild_without_units(model, [unit], modules)
        assert fast[units.index(unit)] == pytest.approx(calibration_perplexity(rebuilt, tiny_calibration), rel=1e-5)
    # with units already removed (the iterative criterion's later rounds): the same, on top of them
    removed = [(2, "mlp"), (4, "attn")]
    later = module_ppl_scores(model, tiny_calibration, modules, batch_size=batch_size, removed=removed, progress=False)
    assert math.isnan(later[units.index((2, "mlp"))]) and math.isnan(later[units.index((4, "attn"))])
    for unit in [(0, "attn"), (6, "mlp")]:
        expected = calibration_perplexity(rebuild_without_units(model, [*removed, unit], modules), tiny_calibration)
        assert later[units.index(unit)] == pytest.approx(expected, rel=1e-5)


def test_taylor_and_magnitude_sum_over_each_units_own_weights(tiny_calibration):
    model = make_tiny_model("llama", 300)
    modules = find_sublayer_modules(model)
    units = all_units(TINY_LAYERS)
    groups = unit_weights(model, modules, units)
    block = model.model.layers[1]
    expected = [*block.self_attn.parameters(), block.input_layernorm.weight]  # unit 1.attn: no biases in llama
    assert len(groups[2]) == len(expected) and all(p is q for p, q in zip(groups[2], expected, strict=True))
    model(tiny_calibration, labels=tiny_calibration).loss.backward()
    official = [sum(float((p.detach() * p.grad).abs().sum()) for p in group) for group in groups]
    model.zero_grad()
    assert taylor_scores(model, tiny_calibration, batch_size=4, groups=groups) == pytest.approx(official, rel=1e-4)
    assert magnitude_scores(model, groups) == pytest.approx(
        [sum(float(p.detach().abs().sum()) for p in group) for group in groups], rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])  # grouped-query attention (4 heads, 2 KV heads);
# qwen2 and gemma2 with per-layer sliding windows
def test_module_pruned_checkpoint_reloads_and_generates_as_the_pruned_model(arch, tmp_path):
    model = make_tiny_model(arch, 300)
    assert save_pruned(model, UNITS, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY_LAYERS - 1
    assert config["skipped_sublayers"] == [["attn"], [], [], [], ["mlp"], [], []]
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_shortened.Shortened{type(model).__name__}"}
    assert model_code_files(tmp_path) == [MODELING_FILE]
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, trust_remote_code=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reloaded).__name__ == f"Shortened{type(model).__name__}"
    layers = find_decoder_layers(reloaded)[1]
    assert type(layers[0].self_attn).__name__ == "SkippedAttention" and type(layers[4].mlp).__name__ == "SkippedMLP"
    assert not any("layers.0.self_attn" in k or "layers.4.mlp." in k for k in reloaded.state_dict())
    prompt = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)  # 20 tokens: beyond the sliding window of 16
    with torch.no_grad():
        full = model(prompt).logits
        torch.testing.assert_close(reloaded.eval()(prompt).logits, full, rtol=0, atol=0)
        expected = model.generate(prompt, use_cache=False, **options)
        assert torch.equal(model.generate(prompt, use_cache=True, **options), expected)
        assert torch.equal(reloaded.generate(prompt, use_cache=True, **options), expected)
        # a prompt continued through the cache (as a chat's next turn): positions and masks come from the
        # cache's length, read at layer 0, which has no attention here
        cache = DynamicCache(config=reloaded.config)
        first = reloaded(prompt[:, :5], past_key_values=cache, use_cache=True).logits  # `cache=` from 5.24 on
        rest = reloaded(prompt[:, 5:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_lost_only_whole_layers_stays_plain(tmp_path):
    model = make_tiny_model("qwen2", 300)
    assert not save_pruned(model, [(2, "attn"), (2, "mlp"), (5, "mlp"), (5, "attn")], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and "skipped_sublayers" not in config and "sublayer_modules" not in config
    assert config["architectures"] == ["Qwen2ForCausalLM"] and not (tmp_path / MODELING_FILE).exists()
    assert len(config["layer_types"]) == TINY_LAYERS - 2
    check_trust_remote_code(tmp_path, False)  # nothing to trust
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_without_trust_remote_code_a_module_pruned_checkpoint_is_refused(tmp_path):
    save_pruned(make_tiny_model("llama", 300), UNITS, tmp_path)
    with pytest.raises(ConfigError, match=r"modeling_shortened.py.*set trust_remote_code=true"):
        check_trust_remote_code(tmp_path, False)
    # what the refusal prevents: transformers' stock class, silently without the removed sub-layers' weights
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert any("layers.0.self_attn" in k for k in info["missing_keys"])


def make_config(model_dir, out, books_path, *overrides):
    return load_config(PruneConfig, None, [
        f"model={model_dir}", f"output_dir={out}", f"calibration.source={books_path}", "calibration.num_samples=4",
        "calibration.seq_len=32", "unit=module", *overrides])


@pytest.mark.parametrize("criterion", ["taylor+", "mag"])  # ppl: below, iterative and on a module-pruned input
def test_the_prune_stage_removes_modules_by_each_criterion(criterion, tiny_model_dirs, books_path, tmp_path):
    out = tmp_path / "pruned"
    result = prune(make_config(tiny_model_dirs["llama"], out, books_path, f"criterion={criterion}",
                               "target.param_ratio=null", "target.num_modules=3"))
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["unit"] == "module" and len(report["scores"]) == len(report["units"]) == 2 * TINY_LAYERS
    assert len(report["removed_modules"]) == 3 and report["units"][:3] == ["0.attn", "0.mlp", "1.attn"]
    protected = [0, 1, 2, 3, 6, 7] if criterion.endswith("+") else []
    candidates = [u for u in report["units"] if int(u.split(".")[0]) not in protected]
    ranked = sorted(candidates, key=lambda u: (report["scores"][report["units"].index(u)], report["units"].index(u)))
    assert sorted(report["removed_modules"]) == sorted(ranked[:3])
    gone = {int(u.split(".")[0]) for u in report["removed_modules"]}
    assert sorted(report["removed"] + report["kept"]) == list(range(TINY_LAYERS)) and set(report["removed"]) <= gone
    assert report["modeling_code"] == any(report["skipped_sublayers"] or [])
    assert (out / "block_importance.png").stat().st_size > 1000
    assert result.removed == report["removed"]


def test_param_ratio_takes_the_least_important_modules_that_fit(tiny_model_dirs, books_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gemma2"])
    sizes = unit_parameter_counts(model, find_sublayer_modules(model))
    total = sum(p.numel() for p in model.parameters())
    ratio = (2 * sizes[(0, "mlp")] + sizes[(0, "attn")]) / total + 1e-6
    report = prune(make_config(tiny_model_dirs["gemma2"], tmp_path / "a", books_path, "criterion=mag",
                               f"target.param_ratio={ratio}")).report
    gone = [(int(i), kind) for i, kind in (u.split(".") for u in report["removed_modules"])]
    removed_params = sum(sizes[u] for u in gone)
    assert removed_params <= ratio * total and report["params_before"] - report["params_after"] == removed_params
    ranked = sorted(report["units"], key=lambda u: (report["scores"][report["units"].index(u)], report["units"].index(u)))
    assert sorted(report["removed_modules"]) == sorted(ranked[:len(gone)])
    layer, kind = ranked[len(gone)].split(".")
    assert removed_params + sizes[(int(layer), kind)] > ratio * total  # the next one would not fit


def test_iterative_module_removal_rescores_after_each_removal(tiny_calibration, tiny_model_dirs, books_path, tmp_path):
    model = make_tiny_model("qwen2", 300)
    modules = find_sublayer_modules(model)
    target = ModuleTarget(unit_parameter_counts(model, modules), protected=[0], num_remove=2)
    order, rounds = iterative_module_order(model, tiny_calibration, modules, target, progress=False)
    units = all_units(TINY_LAYERS)
    one_shot = module_ppl_scores(model, tiny_calibration, modules, progress=False)
    assert rounds[0] == pytest.approx(one_shot, rel=1e-6)
    assert order[0] == min(target.candidates, key=lambda u: (one_shot[units.index(u)], units.index(u)))
    assert math.isnan(rounds[1][units.index(order[0])])  # round 2 scores without the first removal
    assert order[1] == min((u for u in target.candidates if u != order[0]),
                           key=lambda u: (rounds[1][units.index(u)], units.index(u)))
    report = prune(make_config(tiny_model_dirs["llama"], tmp_path / "out", books_path, "iterative=true",
                               "calibration.num_samples=2", "calibration.seq_len=8", "target.param_ratio=null",
                               "target.num_modules=1")).report  # the stage's iterative path
    assert report["removal_order"] == report["removed_modules"] and len(report["rounds"]) == 1


def test_a_module_pruned_checkpoint_prunes_again_only_with_trust_remote_code(tiny_model_dirs, books_path, tmp_path):
    first = tmp_path / "first"
    prune(make_config(tiny_model_dirs["mistral"], first, books_path, "criterion=mag", "target.param_ratio=null",
                      "target.modules=[0.attn, 4.mlp, 6.attn]"))
    second = tmp_path / "second"
    with pytest.raises(ConfigError, match="set trust_remote_code=true"):
        prune(make_config(first, second, books_path, "unit=block", "target.param_ratio=null", "target.num_blocks=1"))
    assert not second.exists()
    report = prune(make_config(first, second, books_path, "trust_remote_code=true", "criterion=ppl",
                               "target.param_ratio=null", "target.modules=[6.mlp, 2.attn]")).report
    assert math.isnan(report["scores"][0]) and report["removed"] == [6]  # 6 had lost its attention already
    config = json.loads((second / "config.json").read_text())
    assert config["skipped_sublayers"] == [["attn"], [], ["attn"], [], ["mlp"], [], []]
    reloaded = AutoModelForCausalLM.from_pretrained(second, trust_remote_code=True)
    assert isinstance(reloaded.model.layers[2].self_attn, torch.nn.Module)
    assert type(reloaded.model.layers[2].self_attn).__name__ == SkippedAttention.__name__
    assert type(reloaded.model.layers[4].mlp).__name__ == SkippedMLP.__name__


@pytest.mark.parametrize("overrides, error, message", [
    (["unit=block", "target.num_modules=2"], ConfigError, "set unit=module"),
    (["target.num_blocks=2", "target.param_ratio=null"], ConfigError, "set target.num_modules or target.modules"),
    (["criterion=block_influence"], ConfigError, "no sub-layer form"),
    (["target.modules=[3.attention]", "target.param_ratio=null"], ConfigError, "LAYER.attn or LAYER.mlp"),
    (["target.modules=[9.attn]", "target.param_ratio=null"], TargetError, "not in the model"),
    (["criterion=ppl+", "target.modules=[1.mlp]", "target.param_ratio=null"], TargetError, "protected layers"),
    (["target.num_modules=16", "target.param_ratio=null"], TargetError, "at least one must remain"),
    (["target.param_ratio=0.0001"], TargetError, "less than the smallest module"),
    (["target.param_ratio=0.5"], TargetError, "as many as all the modules together"),
])
def test_bad_module_targets_fail_before_any_weights_load(overrides, error, message, tiny_model_dirs, books_path,
                                                         tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded before the input was checked"))
    with pytest.raises(error, match=message):
        prune(make_config(tiny_model_dirs["llama"], out, books_path, *overrides))
    assert not out.exists()
