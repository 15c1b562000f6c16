"""Document masking on every attention path we offer, at micro-batch 1, 2 and 4: the same loss and gradients
as the dense reference (an explicit block-diagonal causal mask through eager attention); refusal of paths
that cannot mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.config import ConfigError
from data.loader import collate
from data.nll import IGNORE_INDEX
from data.varlen import boundaries, flatten_documents, varlen_collate
from tests.masking import block_diagonal_mask, packed_samples
from tests.tiny_models import tiny_config
from training import attention
from training.attention import (
    attach_boundaries,
    register_varlen,
    resolve_attention,
    uses_flat_batches,
    varlen_keywords,
)

SEQ, VOCAB = 48, 128
CPU = torch.device("cpu")


def packed_sample(seed: int) -> dict[str, torch.Tensor]:
    """One packed sequence as PackedSequences returns it: documents of random lengths, positions restarting
    at each, the label of each document's first token ignored."""
    return packed_samples(1, SEQ, VOCAB, seed)[0]


def tiny_model(attn: str):
    """The tiny Llama as load_model prepares it: a varlen model derives missing boundaries once per forward."""
    register_varlen()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB), attn_implementation=attn)
    if attn == "varlen":
        attach_boundaries(model)
    return model


def loss_and_grads(attn: str, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model = tiny_model(attn)
    loss = model(**batch, use_cache=False).loss
    if not torch.is_grad_enabled():
        return loss.item(), []
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


def reference_batch(samples: list[dict]) -> dict:
    batch = collate(samples)
    return {**batch, "attention_mask": block_diagonal_mask(batch["position_ids"])}


def reference(samples: list[dict]) -> tuple[float, list[torch.Tensor]]:
    return loss_and_grads("eager", reference_batch(samples))


PATHS = {  # what each path is fed: rows with restarting positions, or the loader's flattened form
    "sdpa": collate, "eager": collate, "varlen": varlen_collate,
    "varlen, boundaries derived once per forward": collate,
}


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_masks_documents_like_the_dense_reference(path, micro_batch, monkeypatch):
    if path == "varlen":  # the loader's boundaries must reach the kernel, not be derived again on the way
        monkeypatch.setattr(attention, "boundaries", None)
        monkeypatch.setattr(attention, "row_boundaries", None)
    samples = [packed_sample(seed) for seed in range(micro_batch)]
    expected_loss, expected_grads = reference(samples)
    loss, grads = loss_and_grads(path.split(",")[0], PATHS[path](samples))
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_reference_is_each_document_run_alone():
    sample = packed_sample(3)
    starts = (sample["position_ids"] == 0).nonzero().flatten().tolist() + [SEQ]
    model = tiny_model("eager")
    packed = model(**reference_batch([sample]), use_cache=False).logits[0]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        alone = model(input_ids=sample["input_ids"][None, a:b], use_cache=False).logits[0]
        torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-4)


def test_without_boundaries_documents_would_attend_to_each_other():
    """The failure the boundaries prevent: plain causal attention over packed rows gives another loss."""
    samples = [packed_sample(seed) for seed in range(2)]
    plain = {k: v for k, v in collate(samples).items() if k != "position_ids"}
    with torch.no_grad():
        assert loss_and_grads("sdpa", plain)[0] != pytest.approx(reference(samples)[0], abs=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_flex_attention_forward_masks_documents():
    """FlexAttention has no CPU backward in torch 2.13: the loss is compared here, gradients on the GPU
    (tests/test_gpu.py)."""
    for micro_batch in (1, 2, 4):
        samples = [packed_sample(seed) for seed in range(micro_batch)]
        assert loss_and_grads("flex_attention", collate(samples))[0] == pytest.approx(reference(samples)[0], abs=1e-5)


def test_flattening_hands_over_the_boundaries():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # a row may start inside a document
    found = boundaries(position_ids)
    assert found["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10] and found["max_length_q"] == 3
    assert found["cu_seq_lens_q"].dtype == torch.int32 and found["cu_seq_lens_k"] is found["cu_seq_lens_q"]
    batch = {"input_ids": position_ids + 10, "labels": position_ids + 10, "position_ids": position_ids}
    flat = flatten_documents(batch)
    assert flat["input_ids"].shape == (1, 10)
    assert flat["labels"][0].tolist() == [IGNORE_INDEX, 11, 12, 10, 11, IGNORE_INDEX, 14, 10, 11, 12]
    with pytest.raises(ValueError, match="padding"):
        flatten_documents({**batch, "attention_mask": torch.ones_like(position_ids)})


def test_varlen_takes_right_padded_rows_and_refuses_left_padding():
    """LoRA's batches and zero-shot requests: right-padded rows without boundaries, as sdpa with the padding mask."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    logits = {}
    for attn in ("sdpa", "varlen"):
        model = tiny_model(attn)
        with torch.no_grad():
            logits[attn] = model(input_ids=ids, attention_mask=right, use_cache=False).logits
    real = right.bool()
    torch.testing.assert_close(logits["varlen"][real], logits["sdpa"][real], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=right.flip(1), use_cache=False)


def test_paths_that_cannot_mask_are_refused():
    assert resolve_attention("auto", CPU, "fp32") == "sdpa"
    assert uses_flat_batches("varlen") and uses_flat_batches("flash_attention_2") and not uses_flat_batches("sdpa")
    with pytest.raises(ConfigError, match="cannot be handed document boundaries"):
        resolve_attention("flash_attention_4", CPU, "fp32")
    with pytest.raises(ConfigError, match="cannot be handed document boundaries"):
        resolve_attention("kernels-community/flash-attn2", CPU, "fp32")
    with pytest.raises(ConfigError, match="flash-attn"):
        resolve_attention("flash_attention_2", CPU, "fp32")
    with pytest.raises(ConfigError, match="no FlexAttention backward"):
        resolve_attention("flex_attention", CPU, "fp32")


@pytest.mark.parametrize("with_positions", [False, True])
def test_boundaries_are_derived_once_per_forward_not_per_layer(with_positions, monkeypatch):
    """LoRA's and lm-eval's forwards carry no boundaries: one computation serves every layer, and rows without
    position_ids need nothing read back from the device (the padding check is the forward's one sync)."""
    calls = []
    for name in ("boundaries", "row_boundaries"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    model = tiny_model("varlen")
    batch = collate([packed_sample(seed) for seed in range(2)])
    if not with_positions:
        batch = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
    with torch.no_grad():
        model(**batch, use_cache=False)
        model(**batch, use_cache=False)
    assert len(model.model.layers) == 8
    assert calls == ["boundaries" if with_positions else "row_boundaries"] * 2


def test_varlen_refuses_a_forward_without_boundaries():
    register_varlen()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB), attn_implementation="varlen")
    with pytest.raises(ValueError, match="no document boundaries.*attach_boundaries"), torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)


# The public varlen_attn signatures of the torch releases the GPU path meets (torch/nn/attention/varlen.py).
def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...
def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)): ...
def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None): ...
def varlen_unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k): ...


@pytest.mark.parametrize(("kernel", "gqa", "expected"), [
    (varlen_2_13, True, {"window_size": (-1, 0), "scale": 0.125, "enable_gqa": True}),
    (varlen_2_13, False, {"window_size": (-1, 0), "scale": 0.125}),
    (varlen_2_11, True, {"window_size": (-1, 0), "scale": 0.125}),  # no keyword: the kernel takes GQA heads as they are
    (varlen_2_10, True, {"is_causal": True})])
def test_varlen_keywords_follow_the_kernels_signature(kernel, gqa, expected):
    assert varlen_keywords(kernel, 0.125, 64, gqa) == expected


def test_a_varlen_kernel_we_cannot_call_causally_is_refused(monkeypatch):
    with pytest.raises(TypeError, match="takes no scale"):
        varlen_keywords(varlen_2_10, 0.5, 64, False)  # a model scaling other than 1/sqrt(head_dim)
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_unknown)
    with pytest.raises(ConfigError, match="neither window_size nor is_causal"):
        attention.check_varlen_kernel()
    monkeypatch.delattr(varlen_module, "varlen_attn")
    with pytest.raises(ConfigError, match="torch 2.10 or later"):
        attention.check_varlen_kernel()
