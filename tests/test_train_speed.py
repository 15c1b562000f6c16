"""The GPU path's settings, checked on the CPU with real components: the loader's varlen batches through
the real trainer, ZeRO settings a real DeepSpeed engine accepts (bf16 with fp32 accumulation and
reduction, bf16 gradients freed at once, fp16 loss scaling), activation checkpointing of every N-th block,
torch.compile of each block, Liger's refusals and the MFU peak table. What only a GPU can check is in
tests/test_gpu.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.config import ConfigError, load_config
from tests.tiny_models import tiny_config
from training.config import CPTConfig
from training.kernels import check_kernels, speed_up
from training.throughput import device_peak_tflops, peak_flops
from training.trainer import deepspeed_config, diverging, zero_settings

COMMON = ["data.seq_len=64", "global_batch=4", "micro_batch=2", "train_steps=2", "validation.every_steps=2",
          "validation.sequences=4", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
          "checkpoint.export_at_end=false", "logging.trackers=[]", "data.num_workers=0"]


def build_trainer(inputs, run_dir, world, *overrides):
    from training.cpt import build_cpt_trainer, plan_cpt

    config = load_config(CPTConfig, None, [f"model={inputs['model']}", f"data.path={inputs['tokens']}",
                                           f"output_dir={run_dir}", *COMMON, *overrides])
    return build_cpt_trainer(config, plan_cpt(config, world), should_stop=lambda: False)


def logged(run_dir, key: str) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record[key] for record in map(json.loads, lines) if key in record]


@pytest.mark.slow
def test_varlen_batches_train_like_the_dense_document_mask(cpt_inputs, tmp_path, single_process_group):
    """The same run with sdpa's dense mask over rows and with the loader's flattened varlen batches."""
    runs = {}
    for attn in ("sdpa", "varlen"):
        trainer = build_trainer(cpt_inputs, tmp_path / attn, single_process_group, f"attn_implementation={attn}")
        batch = next(iter(trainer.loader))
        assert ("cu_seq_lens_q" in batch) == (attn == "varlen")
        assert trainer.train() == "completed"
        runs[attn] = logged(tmp_path / attn, "train.loss") + logged(tmp_path / attn, "val.loss")
    # not bitwise: the dense mask and the per-document path sum in other orders (seen: 1e-7 relative)
    assert runs["varlen"] == pytest.approx(runs["sdpa"], rel=1e-6, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_accepts_bf16_with_fp32_accumulation_and_reduction(stage, cpt_inputs, tmp_path,
                                                                     single_process_group):
    trainer = build_trainer(cpt_inputs, tmp_path / "run", single_process_group, "precision=bf16",
                            f"zero_stage={stage}", "attn_implementation=varlen")
    ds = deepspeed_config(trainer.config, trainer.plan)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["overlap_comm"] is (stage == 2)
    engine = trainer.engine
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.communication_data_type == torch.float32
    if stage == 1:  # DeepSpeed's bf16 optimizer: fp32 gradient buffers, one reduction per optimizer step
        assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    else:
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32 and engine.optimizer.overlap_comm
    assert trainer.train() == "completed"
    assert all(math.isfinite(loss) for loss in logged(tmp_path / "run", "train.loss"))


def test_zero_defaults_per_stage_and_fp32_runs_leave_deepspeeds_dtypes_alone():
    config = load_config(CPTConfig, None, ["train_steps=1", "zero_stage=1"])
    assert "data_types" not in zero_settings(config, "fp32")
    assert zero_settings(config, "bf16")["zero_optimization"]["overlap_comm"] is False
    assert load_config(CPTConfig, None, ["train_steps=1", "zero.overlap_comm=true"]).zero.overlap_comm is True


def loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", 128), attn_implementation="sdpa")


BATCH = {"input_ids": torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1)),
         "position_ids": torch.cat([torch.arange(12), torch.arange(20)]).repeat(2, 1)}
BATCH["labels"] = BATCH["input_ids"]


def test_checkpointing_every_nth_block_gives_the_same_gradients():
    expected = loss_and_grads(tiny_llama(), BATCH)
    model = tiny_llama()
    speed_up(model, "none", False, 2)
    assert [block.gradient_checkpointing for block in model.model.layers] == [True, False] * 4
    loss, grads = loss_and_grads(model, BATCH)
    assert loss == expected[0]
    for got, want in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def cpp_compiler_missing() -> str | None:
    """Why inductor cannot compile CPU kernels here (no working C++ compiler), or None: the only reason to
    skip the compiled-blocks test. Any other failure of compiled blocks is a bug and fails it."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        return f"torch.compile needs a C++ compiler on the CPU: {err}"
    return None


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients():
    missing = cpp_compiler_missing()
    if missing:
        pytest.skip(missing)
    expected = loss_and_grads(tiny_llama(), BATCH)
    model = tiny_llama()
    speed_up(model, "none", True, False)
    loss, grads = loss_and_grads(model, BATCH)
    assert loss.item() == pytest.approx(expected[0].item(), abs=1e-5)
    for got, want in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_liger_is_refused_without_its_package_a_gpu_or_under_zero3(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="liger-kernel package"):
        check_kernels("liger", torch.device("cpu"), 2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_kernels("liger", torch.device("cpu"), 2)
    with pytest.raises(ConfigError, match="lm_head.weight, which ZeRO-3 partitions.*zero_stage=2"):
        check_kernels("liger", torch.device("cuda", 0), 3)
    check_kernels("liger", torch.device("cuda", 0), 2)
    check_kernels("none", torch.device("cpu"), 3)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("Some Future GPU", None)])
def test_peak_table_tells_the_h100_boards_apart(name, tflops):
    assert device_peak_tflops(name) == tflops


def test_fp16_loss_scale_overflows_are_not_divergence():
    assert not diverging("fp16", 2.5) and diverging("fp16", float("nan")) and diverging("bf16", 2.5)


def test_fp16_shares_bf16s_peak_and_fp32_runs_at_half(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert peak_flops(gpu, "fp16", None) == peak_flops(gpu, "bf16", None) == 989.4e12
    assert peak_flops(gpu, "fp32", None) == 989.4e12 / 2
    assert peak_flops(torch.device("cpu"), "bf16", None) is None and peak_flops(gpu, "fp16", 100.0) == 100e12


@pytest.mark.slow  # a DeepSpeed process group in this process
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_frees_each_bf16_gradient_and_scales_fp16_losses(precision, single_process_group):
    """ZeRO-1 in bf16 is DeepSpeed's BF16_Optimizer: with immediate_grad_update no bf16 gradient outlives its
    backward (2 bytes per parameter otherwise held until the step); fp16 gets dynamic loss scaling."""
    import deepspeed

    from training.optim import build_optimizer
    from training.preflight import RunPlan

    if precision == "fp16" and not deepspeed.get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has no fp16 kernels (oneDNN), so DeepSpeed refuses fp16 on it")
    config = load_config(CPTConfig, None, ["train_steps=2", "global_batch=2", "micro_batch=1", "zero_stage=1",
                                           f"precision={precision}"])
    plan = RunPlan(single_process_group, "tiny", 2, 2, 32, precision, torch.device("cpu"), {}, None, False, "sdpa")
    ds = deepspeed_config(config, plan)
    assert ds["bf16"] == {"enabled": precision == "bf16", "immediate_grad_update": True}
    assert ds["fp16"] == {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    model = tiny_llama().to(torch.bfloat16 if precision == "bf16" else torch.float16)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optimizer, False), config=ds)
    assert engine.fp16_enabled() is (precision == "fp16") and engine.bfloat16_enabled() is (precision == "bf16")
    for _ in range(2):
        batch = {k: v[:1] for k, v in BATCH.items()}
        engine.backward(engine(**batch, use_cache=False).loss)
        if precision == "bf16":
            assert type(engine.optimizer).__name__ == "BF16_Optimizer" and engine.optimizer.immediate_grad_update
            assert all(p.grad is None for p in model.parameters())
        engine.step()
    if precision == "fp16":
        assert engine.optimizer.dynamic_loss_scale and engine.optimizer.loss_scale <= 2**16
    assert engine.global_steps == 1 and math.isfinite(float(engine.get_global_grad_norm()))
