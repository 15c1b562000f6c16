import math

import pytest
import torch

from pruning.layers import find_decoder_layers, rebuild_without
from pruning.scores import (
    block_influence_scores,
    calibration_perplexity,
    iterative_ppl_order,
    magnitude_scores,
    ppl_scores,
    ppl_scores_rebuild,
    taylor_scores,
)
from tests.tiny_models import ARCHITECTURES, TINY_LAYERS, make_tiny_model


@pytest.fixture(scope="module")
def tiny_calibration(calibration):
    return calibration % 300


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_ppl_equals_rebuild_and_run(arch, tiny_calibration):
    model = make_tiny_model(arch, 300)
    fast = ppl_scores(model, tiny_calibration, batch_size=3, progress=False)
    naive = ppl_scores_rebuild(model, tiny_calibration, batch_size=3, progress=False)
    assert fast == pytest.approx(naive, rel=1e-5)
    assert len(set(round(s, 3) for s in fast)) > TINY_LAYERS // 2  # blocks really differ


def test_fast_ppl_equals_rebuild_on_smollm2(smollm2_dir, calibration):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    blocks = [0, 3, 14, 28, 29]
    fast = ppl_scores(model, calibration, batch_size=4, progress=False)
    naive = ppl_scores_rebuild(model, calibration, batch_size=4, progress=False, blocks=blocks)
    assert [fast[i] for i in blocks] == pytest.approx(naive, rel=1e-5)
    assert fast[0] > 10 * min(fast)  # the first block of a trained model matters most


def test_ppl_with_removed_blocks_equals_rebuild(tiny_calibration):
    model = make_tiny_model("gemma2", 300)
    fast = ppl_scores(model, tiny_calibration, removed=[2], progress=False)
    assert math.isnan(fast[2])
    for i in (0, 5, TINY_LAYERS - 1):
        assert fast[i] == pytest.approx(calibration_perplexity(rebuild_without(model, [2, i]), tiny_calibration),
                                        rel=1e-5)


def test_iterative_ppl_rescoring(tiny_calibration):
    model = make_tiny_model("llama", 300)
    one_shot = ppl_scores(model, tiny_calibration, progress=False)
    order, rounds = iterative_ppl_order(model, tiny_calibration, 3, protected=[0], progress=False)
    assert len(order) == 3 and len(set(order)) == 3 and 0 not in order
    assert order[0] == min(range(1, TINY_LAYERS), key=lambda i: one_shot[i])
    assert rounds[0] == pytest.approx(one_shot, rel=1e-6)
    second = [calibration_perplexity(rebuild_without(model, [order[0], i]), tiny_calibration)
              if i != order[0] else math.nan for i in range(TINY_LAYERS)]
    assert [s for s in rounds[1] if not math.isnan(s)] == pytest.approx(
        [s for s in second if not math.isnan(s)], rel=1e-5)


def _official_taylor(model, calibration, batch_size):
    """The official computation (anal_block_sensitivity_taylor.py), written out plainly: W * G summed
    over batches per element, then abs() per element, summed over input and output dims and weights."""
    salience = {}
    for i in range(0, calibration.size(0), batch_size):
        batch = calibration[i:i + batch_size]
        model(batch, labels=batch).loss.backward()
        for name, param in model.named_parameters():
            if "weight" in name and "embed_tokens" not in name:
                product = (param * param.grad).data.clone().float()
                salience[name] = salience[name] + product if name in salience else product
        model.zero_grad()
    path, layers = find_decoder_layers(model)
    scores = []
    for index, block in enumerate(layers):
        total = 0.0
        for name, _ in block.named_parameters():
            if name.endswith("weight"):
                value = salience[f"{path}.{index}.{name}"].abs()
                total += float(value.sum(1).sum(0) if value.dim() == 2 else value.sum(0))
        scores.append(total)
    return scores


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [4, 1])  # one backward (reduced in the hook) or four (accumulated)
def test_taylor_equals_the_official_formula(arch, batch_size, tiny_calibration):
    model = make_tiny_model(arch, 300)
    ours = taylor_scores(model, tiny_calibration, batch_size=batch_size)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    official = _official_taylor(model, tiny_calibration, batch_size)
    assert ours == pytest.approx(official, rel=1e-4)


def test_taylor_is_not_the_per_neuron_reduction(tiny_calibration):
    """|sum_j G_ij W_ij| per output neuron lets terms cancel: it is smaller than the official score."""
    model = make_tiny_model("llama", 300)
    ours = taylor_scores(model, tiny_calibration, batch_size=4)
    model.zero_grad()
    model(tiny_calibration, labels=tiny_calibration).loss.backward()
    _, layers = find_decoder_layers(model)
    per_neuron = [sum(float((p.detach() * p.grad).reshape(p.shape[0], -1).sum(1).abs().sum())
                      for n, p in block.named_parameters() if n.endswith("weight")) for block in layers]
    assert all(o > n for o, n in zip(ours, per_neuron, strict=True))


@pytest.mark.slow
def test_taylor_equals_the_official_formula_on_smollm2(smollm2_dir, calibration):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ours = taylor_scores(model, calibration, batch_size=len(calibration))
    official = _official_taylor(model, calibration, len(calibration))
    assert ours == pytest.approx(official, rel=1e-4)


def test_taylor_never_holds_all_gradients(tiny_calibration):
    model = make_tiny_model("llama", 300)
    _, layers = find_decoder_layers(model)
    block_params = [p for block in layers for n, p in block.named_parameters() if n.endswith("weight")]
    peak = [0]

    def watch(param):
        live = sum(1 for p in block_params if p.grad is not None)
        peak[0] = max(peak[0], live)

    handles = [p.register_post_accumulate_grad_hook(watch) for p in block_params]
    taylor_scores(model, tiny_calibration, batch_size=2)
    for h in handles:
        h.remove()
    assert 1 <= peak[0] <= 2  # at most the gradient being reduced (hooks run in registration order)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_magnitude_and_block_influence(arch, tiny_calibration):
    model = make_tiny_model(arch, 300)
    _, layers = find_decoder_layers(model)
    mags = magnitude_scores(model)
    expected = [sum(float(p.detach().abs().sum()) for n, p in b.named_parameters() if n.endswith("weight")) for b in layers]
    assert mags == pytest.approx(expected, rel=1e-5)
    influence = block_influence_scores(model, tiny_calibration, batch_size=3)
    with torch.no_grad():
        hidden = model(input_ids=tiny_calibration, output_hidden_states=True).hidden_states
    for i in range(TINY_LAYERS - 1):  # the last entry of hidden_states is after the final norm
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert influence[i] == pytest.approx(float((1 - cos).mean()), rel=1e-4, abs=1e-6)
