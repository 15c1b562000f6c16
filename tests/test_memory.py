"""The memory model (training/memory.py): its per-block coefficients against the bytes the kernels keep, its
parts, the preflight refusal, and the recipes' notes and README table it writes (launch/memory.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from data.config import ConfigError, load_config
from data.loader import collate
from data.varlen import varlen_collate
from launch import memory as notes
from tests.fixtures import ROOT
from tests.masking import packed_samples
from tests.saved_bytes import saved_bytes_per_token
from training.attention import attach_boundaries, register_varlen, uses_flat_batches
from training.config import CPTConfig
from training.memory import (
    GIB,
    GPUS,
    RESERVE,
    ModelShape,
    Setup,
    block_activation_bytes,
    estimate_memory,
    refusal,
)

SEQ, MICRO = 40, 2


def tiny(kv_heads: int, attention: str, dtype: torch.dtype):
    register_varlen()
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    if attention == "varlen":
        attach_boundaries(model)
    return model, ModelShape.from_config(config)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_the_bytes_each_kernel_keeps_per_block_are_the_models_coefficients(attention, dtype, kv_heads):
    """Counted with saved-tensor hooks on packed multi-document rows (so sdpa gets its document mask), against
    `block_activation_bytes`, to the byte."""
    model, shape = tiny(kv_heads, attention, dtype)
    samples = packed_samples(MICRO, SEQ, 96, seed=3)
    batch = (varlen_collate if uses_flat_batches(attention) else collate)(samples)
    expected = block_activation_bytes(shape, attention, dtype.itemsize, SEQ)
    assert saved_bytes_per_token(model, batch) == expected


LLAMA_7B_26 = ModelShape.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=26,
                                                 num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False))


def test_the_estimate_adds_up_the_parts_of_a_7b_run():
    p, setup = LLAMA_7B_26.parameters, Setup(zero_stage=1, world_size=8, micro_batch=2)
    parts = estimate_memory(LLAMA_7B_26, setup).parts
    assert parts["weights"] == 2 * p and parts["optimizer"] == 12 * p / 8 and parts["reserve"] == RESERVE
    assert parts["gradients"] == 4 * p + 2 * LLAMA_7B_26.block_parameters  # fp32 buffer + one block in flight
    per_token = 26 * block_activation_bytes(LLAMA_7B_26, "varlen", 2, 2048) + 4 * 4096 + 4 + 4 * 4096
    assert parts["activations"] == per_token * 2 * 2048
    assert parts["logits"] == 12 * 32000 * 2 * 2048
    zero2 = estimate_memory(LLAMA_7B_26, Setup(zero_stage=2)).parts
    assert zero2["gradients"] == 4 * p / 8 + 200_000_000 * (2 * 2 + 4)  # a partition + two bf16 buckets + fp32
    fp16 = estimate_memory(LLAMA_7B_26, Setup(precision="fp16")).parts
    assert fp16["gradients"] == 4 * p + 2 * p  # no immediate_grad_update for fp16: all bf16 grads at once
    zero3 = estimate_memory(LLAMA_7B_26, Setup(zero_stage=3)).parts  # a partition + two blocks gathered
    assert zero3["weights"] == 2 * p / 8 + 2 * 2 * LLAMA_7B_26.block_parameters


def test_recomputation_liger_and_a_teacher_change_their_parts():
    base = estimate_memory(LLAMA_7B_26, Setup()).parts
    every_other = estimate_memory(LLAMA_7B_26, Setup(checkpointing=2)).parts["activations"]
    every = estimate_memory(LLAMA_7B_26, Setup(checkpointing=True)).parts["activations"]
    assert every < every_other < base["activations"]
    liger = estimate_memory(LLAMA_7B_26, Setup(kernels="liger")).parts["logits"]
    assert liger == 4 * 32000 * 4096 < base["logits"]
    teacher = ModelShape.from_config(LlamaConfig(num_hidden_layers=32, vocab_size=32000))
    alpha0 = estimate_memory(LLAMA_7B_26, Setup(teacher=teacher)).parts
    alpha1 = estimate_memory(LLAMA_7B_26, Setup(teacher=teacher, distill_alpha=0.5)).parts
    assert alpha0["teacher"] == 2 * teacher.parameters
    assert alpha1["logits"] - alpha0["logits"] == base["logits"]  # the cross-entropy only when alpha > 0


def test_a_run_that_does_not_fit_is_refused_with_what_to_change():
    h100 = GPUS["H100 80 GB"]
    message = refusal(LLAMA_7B_26, Setup(micro_batch=4), "NVIDIA H100 80GB HBM3", h100)
    assert re.search(r"about 82\.\d GiB \(weights .*\) per GPU, more than the 79\.6 GiB of NVIDIA H100 80GB HBM3", message)
    assert "set micro_batch=2 (62.1 GiB), or activation_checkpointing=2" in message
    assert message.endswith("memory_check=false launches it anyway")
    assert refusal(LLAMA_7B_26, Setup(micro_batch=2), "NVIDIA H100 80GB HBM3", h100) is None


def test_the_preflight_refuses_on_a_gpu_that_is_too_small(cpt_inputs, tmp_path, monkeypatch):
    """plan_cpt on a (pretended) CUDA GPU of 64 MiB: refused before anything starts; memory_check=false lets it by;
    a second rank on a one-GPU node is refused; with DeepSpeed on the CPU accelerator the run stays on the CPU
    (DeepSpeed's launcher makes GPUs visible to CPU ranks)."""
    from training.cpt import plan_cpt
    from training.distributed import WorldInfo

    properties = type("Properties", (), {"total_memory": 64 * 2**20})()
    for name, value in {"is_available": lambda: True, "device_count": lambda: 1,
                        "get_device_name": lambda device=None: "Tiny GPU",
                        "get_device_properties": lambda device=None: properties}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    overrides = [f"model={cpt_inputs['model']}", f"data.path={cpt_inputs['tokens']}", f"output_dir={tmp_path}",
                 "train_steps=1", "global_batch=2", "attn_implementation=sdpa", "validation.every_steps=0"]
    with pytest.raises(ConfigError, match=r"more than the 0\.1 GiB of Tiny GPU.*memory_check=false"):
        plan_cpt(load_config(CPTConfig, None, overrides), WorldInfo(0, 0, 1))
    assert plan_cpt(load_config(CPTConfig, None, [*overrides, "memory_check=false"]), WorldInfo(0, 0, 1))
    with pytest.raises(ConfigError, match="local rank 1 has no GPU of its own"):
        plan_cpt(load_config(CPTConfig, None, [*overrides, "memory_check=false", "global_batch=4"]), WorldInfo(1, 1, 2))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed on the CPU: so is the model, GPU or not
    assert plan_cpt(load_config(CPTConfig, None, overrides), WorldInfo(0, 0, 1)).device.type == "cpu"


@pytest.mark.parametrize("recipe", notes.recipes(), ids=lambda path: path.name)
def test_each_recipes_memory_note_is_the_models(recipe):
    """The note in the recipe's header is what launch/memory.py computes now, the recipe is the H100's setting,
    and every recommended setting stays within 85% of its GPU."""
    text = recipe.read_text().splitlines()
    first = next(i for i, line in enumerate(text) if line.startswith(notes.NOTE_START))
    note = notes.recipe_note(recipe)
    assert text[first:first + len(note)] == note, "rerun: python launch/memory.py --write"
    config = load_config(CPTConfig, recipe)
    assert notes.settings_text(config) == notes.settings_text(notes.recommend(recipe, GPUS["H100 80 GB"]))
    for line, device_bytes in zip(note[3:5], GPUS.values(), strict=True):
        assert float(re.search(r"-> ([\d.]+) of", line).group(1)) * GIB <= 0.85 * device_bytes


def test_the_readme_memory_table_is_the_models():
    readme = (ROOT / "README.md").read_text().splitlines()
    first = readme.index(notes.TABLE_START)
    table = notes.readme_table()
    assert readme[first:first + len(table)] == table, "rerun: python launch/memory.py --write"
    text = (ROOT / "README.md").read_text()
    for attention in ("sdpa", "varlen"):  # the per-block figures the README quotes
        assert f"{block_activation_bytes(LLAMA_7B_26, attention, 2, 2048):,}" in text


def test_the_memory_script_prints_a_configs_estimate(capsys):
    assert notes.main(["--config", str(ROOT / "configs/cpt/vicuna7b_ppl_20.yaml"), "micro_batch=4"]) == 0
    assert "zero_stage=1 micro_batch=4 activation_checkpointing=false on 8 GPUs" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no config.json there"):
        notes.model_shape(str(Path("/nonexistent/model")))
