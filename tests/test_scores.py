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


def _direct_taylor(model, calibration):
    """All gradients at once, then per-output-neuron |sum W*G|: the definition, computed plainly."""
    model.zero_grad()
    model(input_ids=calibration, labels=calibration).loss.backward()
    _, layers = find_decoder_layers(model)
    scores = []
    for block in layers:
        total = 0.0
        for name, p in block.named_parameters():
            if name.endswith("weight"):
                product = p.detach() * p.grad
                rows = product.reshape(product.shape[0], -1).sum(1) if product.dim() > 1 else product
                total += float(rows.abs().sum())
        scores.append(total)
    model.zero_grad()
    return scores


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_taylor_equals_direct_computation(arch, tiny_calibration):
    model = make_tiny_model(arch, 300)
    streamed = taylor_scores(model, tiny_calibration, batch_size=1)  # 4 backward passes, reduced as they go
    direct = _direct_taylor(model, tiny_calibration)
    assert streamed == pytest.approx(direct, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


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
