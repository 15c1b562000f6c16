"""The GPU path's settings, checked on the CPU with real components: the loader's varlen batches through
the real trainer, ZeRO settings a real DeepSpeed engine accepts (bf16 with fp32 accumulation and
reduction), activation checkpointing of every N-th block, torch.compile of each block, Liger's kernels
and the MFU peak table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.config import ConfigError, load_config
from tests.fixtures import ROOT
from tests.tiny_models import tiny_config
from training.config import CPTConfig
from training.kernels import check_kernels, speed_up
from training.throughput import device_peak_tflops
from training.trainer import deepspeed_config, zero_settings

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
    assert runs["varlen"] == pytest.approx(runs["sdpa"], rel=1e-5)


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


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients():
    expected = loss_and_grads(tiny_llama(), BATCH)
    model = tiny_llama()
    speed_up(model, "none", True, False)
    try:
        loss, grads = loss_and_grads(model, BATCH)
    except Exception as err:  # noqa: BLE001  (inductor needs a working C++ compiler on the CPU)
        pytest.skip(f"torch.compile cannot build kernels on this machine: {err.__class__.__name__}: {err}"[:300])
    assert loss.item() == pytest.approx(expected[0].item(), abs=1e-5)
    for got, want in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_liger_is_refused_without_its_package_or_a_gpu(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="liger-kernel package"):
        check_kernels("liger", torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_kernels("liger", torch.device("cpu"))
    check_kernels("none", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton kernels: CUDA GPUs only")
def test_liger_kernels_give_the_same_loss():
    pytest.importorskip("liger_kernel", reason="the liger-kernel package is not installed")
    batch = {k: v.cuda() for k, v in BATCH.items()}
    expected = loss_and_grads(tiny_llama().cuda(), batch)[0]
    model = tiny_llama().cuda()
    speed_up(model, "liger", False, False)
    assert loss_and_grads(model, batch)[0].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("Some Future GPU", None)])
def test_peak_table_tells_the_h100_boards_apart(name, tflops):
    assert device_peak_tflops(name) == tflops


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """No GPU is lent to this project's CI: the H200 benchmark runs its tiny shape here, so it is known to work."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "bench_gpu.py"), "--tiny",
                             "--paths", "sdpa,varlen,varlen+liger", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    sdpa, varlen, liger = (report["results"][path] for path in ("sdpa", "varlen", "varlen+liger"))
    assert sdpa["tokens_per_s"] > 0 and varlen["tokens_per_s"] > 0 and varlen["mfu"] is None  # no MFU on a CPU
    assert varlen["losses"] == pytest.approx(sdpa["losses"], rel=1e-5) and report["losses_agree"]
    assert "liger" in liger["refused"]
    assert "| varlen | 2 |" in result.stdout
