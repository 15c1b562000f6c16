"""What only a CUDA GPU can check; `make gpu-check` runs these (the CPU suite skips them, saying why).

Every attention path we offer (varlen, sdpa's dense mask, flex_attention, flash-attn when installed), Liger's
kernels and compiled blocks train a small grouped-query Llama on packed multi-document sequences like the fp32
dense-mask reference, while a no-mask control must differ (tests/masking.py); the bytes each GPU kernel keeps
per block are the memory model's; distillation runs with and without Liger; the refusals hold on a real GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from data.config import ConfigError
from data.loader import collate, to_device
from data.varlen import varlen_collate
from tests.masking import masking_check, packed_samples
from tests.saved_bytes import saved_bytes_per_token
from training.attention import (
    attach_boundaries,
    check_varlen_kernel,
    register_varlen,
    resolve_attention,
    uses_flat_batches,
    varlen_keywords,
)
from training.kernels import check_kernels, speed_up
from training.memory import ModelShape, Setup, block_activation_bytes, refusal

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
PATHS = {"varlen": ("varlen", "none", False), "sdpa": ("sdpa", "none", False),
         "flex_attention": ("flex_attention", "none", False), "flash_attention_2": ("flash_attention_2", "none", False),
         "varlen+liger": ("varlen", "liger", False), "varlen+compile": ("varlen", "none", True)}
PACKAGES = {"flash_attention_2": "flash_attn", "varlen+liger": "liger_kernel"}


@pytest.fixture
def unpatched_llama():
    """Liger patches transformers' Llama module itself (RoPE, the RMSNorm and MLP classes), not only the model it
    is applied to: put the module back, so the tests after a Liger test measure transformers' own code."""
    from transformers.models.llama import modeling_llama

    saved, forward = dict(vars(modeling_llama)), modeling_llama.LlamaForCausalLM.forward
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)
    modeling_llama.LlamaForCausalLM.forward = forward


def require(path: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    package = PACKAGES.get(path)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (bring its wheel: README, On a GPU)")


@pytest.mark.parametrize("path", PATHS)
def test_every_path_trains_like_the_fp32_dense_mask_reference(path, unpatched_llama):
    """Four optimizer steps in bf16 on packed sequences of several documents each: losses and last gradients
    ten times closer to the fp32 reference (eager, explicit block-diagonal mask) than the no-mask control is."""
    require(path)
    attention, kernels, compile_blocks = PATHS[path]
    result = masking_check(attention, CUDA, torch.bfloat16, kernels, compile_blocks)
    print(path, result.summary())
    assert result.control_grad_error > 0.1, "the control must differ, or the check could not see a masking bug"
    assert result.agrees, result.summary()


@pytest.mark.parametrize("attention", ["varlen", "sdpa", "flex_attention", "flash_attention_2"])
def test_the_bytes_each_gpu_kernel_keeps_per_block_are_the_models(attention):
    require(attention)
    from transformers import AutoModelForCausalLM, LlamaConfig

    register_varlen()
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.bfloat16).to(CUDA)
    if attention == "varlen":
        attach_boundaries(model)
    samples = packed_samples(2, 256, 512, seed=0)
    batch = to_device((varlen_collate if uses_flat_batches(attention) else collate)(samples), CUDA)
    measured = saved_bytes_per_token(model, batch)
    expected = block_activation_bytes(ModelShape.from_config(config), attention, 2, 256)
    assert measured == pytest.approx(expected, rel=0.01), f"{attention}: measured {measured}, the model {expected}"


def test_distillation_runs_with_and_without_liger(unpatched_llama):
    """Liger's fused loss returns no logits when given labels; the distillation loss never gives it labels."""
    require("varlen+liger")
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config
    from training.distill import DistillLoss
    from training.trainer import metric_value

    def model(seed: int):
        torch.manual_seed(seed)
        built = AutoModelForCausalLM.from_config(tiny_config("llama", 100), attn_implementation="varlen")
        attach_boundaries(built)
        return built.to(CUDA, torch.bfloat16)

    register_varlen()
    batch = to_device(varlen_collate(packed_samples(2, 64, 100, seed=1)), CUDA)
    results = {}
    for kernels in ("none", "liger"):
        for alpha in (0.0, 0.5):
            student = model(1).train()
            speed_up(student, kernels, False, False)
            loss, metrics = DistillLoss(model(2), alpha, 1.0, chunk=32)(student, batch)
            loss.backward()
            assert metric_value(metrics["perf.teacher_s"]) > 0 and ("train.ce" in metrics) is (alpha > 0)
            results[kernels, alpha] = float(loss.detach())
    for alpha in (0.0, 0.5):
        assert results["liger", alpha] == pytest.approx(results["none", alpha], rel=2e-2)


def test_the_refusals_hold_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from torch.nn.attention.varlen import varlen_attn

    check_varlen_kernel()  # this torch's kernel can be called causally
    keywords = varlen_keywords(varlen_attn, None, 128, True)
    assert keywords.get("window_size") == (-1, 0) or keywords.get("is_causal") is True
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        resolve_attention("varlen", CUDA, "fp32")
    with pytest.raises(ConfigError, match="lm_head.weight|liger-kernel"):
        check_kernels("liger", CUDA, 3)
    from transformers import LlamaConfig

    llama_7b = ModelShape.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                  num_attention_heads=32, vocab_size=32000))
    total = torch.cuda.get_device_properties(CUDA).total_memory
    message = refusal(llama_7b, Setup(world_size=1, micro_batch=8), torch.cuda.get_device_name(CUDA), total)
    assert message is not None and "memory_check=false" in message  # 6.7B with all its optimizer state on one GPU
