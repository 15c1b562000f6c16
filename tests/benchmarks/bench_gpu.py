"""Throughput and memory of the CPT path on one GPU, every attention and kernel path side by side, in one go.

  python tests/benchmarks/bench_gpu.py                 # on a CUDA GPU: the largest LLaMA-7B-shaped model that fits
  python tests/benchmarks/bench_gpu.py --tiny          # a tiny shape, anywhere (the CPU smoke run of make gpu-check)
  python tests/benchmarks/bench_gpu.py --paths varlen,varlen+liger --json results.json

The GPU shape is the paper's LLaMA-7B block (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with
random weights, bf16, sequences of 2048 tokens packed from documents of random lengths, micro-batch 2,
DeepSpeed ZeRO-1 with fp32 gradient accumulation (the recipes' settings, `training/trainer.deepspeed_config`),
torch's AdamW, gradient accumulation 2, one GPU. One GPU holds every byte of the optimizer state (18 bytes
per parameter: the 26-block 5.5B model needs ~93 GiB before activations), so the number of blocks is the
largest whose memory estimate (`training/memory.py`) stays within 85% of this GPU's memory: 14 on an 80 GB
H100, all 26 on a 141 GB H200. Built to finish within 5 minutes on one H100 (paths left after --budget-s are
listed as skipped).

Paths: `varlen` (the loader's flattened batches and PyTorch's flash varlen kernel), `sdpa` (transformers'
dense document mask), `varlen+liger` (Liger's fused kernels), `flex_attention`, `varlen+compile`
(torch.compile of each block), `flash_attention_2` (if flash-attn is installed). Each runs in its own
process: clean peak memory, and Liger's module-level patches stay there.

Reported per path: tokens/s and MFU (PaLM's model FLOPs, `training/throughput.py`, against the device's
dense bf16 peak) over the steps after 2 warm-up steps; peak memory (`torch.cuda.max_memory_allocated`)
next to the memory model's estimate for that path (without its 3 GiB reserve, which the allocator's peak
does not see); and the masking check (`tests/masking.py`): a small GQA Llama with the path's kernels,
trained 4 optimizer steps on packed multi-document sequences, whose losses and gradients must be ten
times closer to an fp32 dense-mask reference than a no-mask control's are. The exit code is 1 when a path
fails or disagrees. A path the machine cannot run is listed with the reason (a missing package is named).
It installs nothing: it needs torch, transformers and deepspeed, and liger-kernel or flash-attn for those
paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATHS = {"varlen": ("varlen", "none", False), "sdpa": ("sdpa", "none", False),
         "varlen+liger": ("varlen", "liger", False), "flex_attention": ("flex_attention", "none", False),
         "varlen+compile": ("varlen", "none", True), "flash_attention_2": ("flash_attention_2", "none", False)}
LLAMA_7B_BLOCK = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
GPU_SEQ, TINY_SEQ, MICRO, MAX_BLOCKS = 2048, 128, 2, 26
ACCUMULATION, WARMUP, TIMED = 2, 2, 3
FILL = 0.85  # the share of the GPU's memory the chosen shape's estimate may take
OOM = 3  # a child's exit code when the micro-batch does not fit


def missing_packages() -> list[str]:
    return [name for name in ("torch", "transformers", "deepspeed") if importlib.util.find_spec(name) is None]


def memory_setup(attention: str, kernels: str, seq_len: int, micro: int, precision: str):
    from training.memory import Setup

    return Setup(zero_stage=1, world_size=1, micro_batch=micro, seq_len=seq_len, precision=precision,
                 attention=attention, kernels=kernels)


def llama_config(blocks: int, shape: dict, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, num_hidden_layers=blocks, max_position_embeddings=seq_len, tie_word_embeddings=False)


def largest_blocks(device_bytes: int) -> tuple[int, float]:
    """The most LLaMA-7B blocks (at most 26) whose estimate on one GPU stays within FILL of its memory, for the
    attention path that keeps the most (flex_attention)."""
    from training.memory import ModelShape, estimate_memory

    for blocks in range(MAX_BLOCKS, 0, -1):
        estimate = estimate_memory(ModelShape.from_config(llama_config(blocks, LLAMA_7B_BLOCK, GPU_SEQ)),
                                   memory_setup("flex_attention", "none", GPU_SEQ, MICRO, "bf16"))
        if estimate.total <= FILL * device_bytes:
            return blocks, estimate.total
    raise SystemExit(f"not even one LLaMA-7B block fits in {device_bytes / 2**30:.0f} GiB")


def child(path: str, micro: int, blocks: int, tiny: bool, out: Path) -> int:
    """One path in this process: the masking check, then WARMUP + TIMED steps; the figures go to `out`."""
    import torch

    from data.config import ConfigError, load_config
    from data.loader import collate, to_device
    from data.precision import resolve_device, torch_dtype
    from data.varlen import varlen_collate
    from tests.masking import TINY_CHECK_SEQ, TINY_CHECK_SHAPE, masking_check, packed_samples
    from training.attention import attach_boundaries, register_varlen, resolve_attention, uses_flat_batches
    from training.config import CPTConfig
    from training.distributed import init_distributed, prepare_environment
    from training.kernels import check_kernels, speed_up
    from training.memory import RESERVE, ModelShape, estimate_memory
    from training.optim import build_optimizer
    from training.preflight import RunPlan
    from training.throughput import flops_per_token, peak_flops, peak_memory_gb
    from training.trainer import deepspeed_config

    attn, kernels, compile_blocks = PATHS[path]
    shape, seq_len = (TINY, TINY_SEQ) if tiny else (LLAMA_7B_BLOCK, GPU_SEQ)
    device = resolve_device()
    precision = "bf16" if device.type == "cuda" else "fp32"
    config = load_config(CPTConfig, None, [f"global_batch={micro * ACCUMULATION}", f"micro_batch={micro}",
                                           "zero_stage=1", f"precision={precision}", "train_steps=1000",
                                           f"attn_implementation={attn}", f"kernels={kernels}",
                                           f"compile={compile_blocks}", "optimizer.lr=1e-4"])
    try:
        attention = resolve_attention(attn, device, precision)
        check_kernels(kernels, device, config.zero_stage)
    except ConfigError as err:
        out.write_text(json.dumps({"refused": str(err)}))
        return 0
    import deepspeed
    from transformers import AutoModelForCausalLM

    check = masking_check(attention, device, torch_dtype(precision), kernels, compile_blocks,
                          *((TINY_CHECK_SHAPE, TINY_CHECK_SEQ) if tiny else ()))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    world = prepare_environment()
    init_distributed()
    plan = RunPlan(world, "random", ACCUMULATION, 1000, seq_len, precision, device, {}, None, False, attention)
    register_varlen()
    model_config = llama_config(blocks, shape, seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attention,
                                                 dtype=torch_dtype(precision))
    model.config.use_cache = False
    if attention == "varlen":
        attach_boundaries(model)
    speed_up(model, kernels, compile_blocks, False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optimizer,
                                                                             device.type == "cuda"),
                                      config=deepspeed_config(config, plan))
    batching = varlen_collate if uses_flat_batches(attention) else collate
    samples = packed_samples(micro * ACCUMULATION * (WARMUP + TIMED), seq_len, shape["vocab_size"], seed=1)
    losses, seconds = [], []
    for step in range(WARMUP + TIMED):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, step_losses = time.perf_counter(), []
        for m in range(ACCUMULATION):
            first = (step * ACCUMULATION + m) * micro
            loss = engine(**to_device(batching(samples[first:first + micro]), device), use_cache=False).loss
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.detach().float())
        losses.append(float(torch.stack(step_losses).mean()))  # synchronizes
        seconds.append(time.perf_counter() - started)
    timed = sorted(seconds[WARMUP:])[len(seconds[WARMUP:]) // 2]
    tokens_per_s = micro * ACCUMULATION * seq_len / timed
    peak = peak_flops(device, precision, None)
    estimate = estimate_memory(ModelShape.from_config(model_config),
                               memory_setup(attention, kernels, seq_len, micro, precision))
    out.write_text(json.dumps({
        "micro_batch": micro, "blocks": blocks, "tokens_per_s": tokens_per_s, "step_s": timed,
        "mfu": flops_per_token(model, seq_len) * tokens_per_s / peak if peak else None,
        "peak_memory_gb": peak_memory_gb(device), "estimate_gb": (estimate.total - RESERVE) / 2**30,
        "estimate_parts_gb": {k: v / 2**30 for k, v in estimate.parts.items()}, "losses": losses,
        "masking": check.summary(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}))
    return 0


def run_path(path: str, micro: int, blocks: int, tiny: bool, scratch: Path) -> tuple[int, dict]:
    out = scratch / f"{path}-{micro}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # each child is its own one-process world
    command = [sys.executable, __file__, "--child", path, "--micro", str(micro), "--blocks", str(blocks),
               "--out", str(out)] + (["--tiny"] if tiny else [])
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode == OOM:
        return OOM, {}
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return result.returncode, {"failed": lines[-1] if lines else f"exit code {result.returncode}"}
    return 0, json.loads(out.read_text())


def table(results: dict[str, dict]) -> str:
    lines = ["| path | micro-batch | tokens/s | MFU | peak memory GiB | estimate GiB | masking: loss / grad error "
             "(control) | agrees |", "|---|---|---|---|---|---|---|---|"]
    for path, r in results.items():
        if "tokens_per_s" not in r:
            lines.append(f"| {path} | {r.get('refused') or r.get('failed') or r.get('skipped')} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        m = r["masking"]
        lines.append(f"| {path} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_gb']:.1f} | "
                     f"{r['estimate_gb']:.1f} | {m['loss_error']:.1e} / {m['grad_error']:.1e} "
                     f"({m['control_loss_error']:.1e} / {m['control_grad_error']:.1e}) | {m['agrees']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (default on a machine without CUDA)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the paths left after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, default=MICRO, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        print(f"missing packages: {', '.join(missing)} (install them into this environment; nothing is installed "
              "by this script)", file=sys.stderr)
        return 2
    import torch

    if args.child:
        try:
            return child(args.child, args.micro, args.blocks, args.tiny, args.out)
        except torch.OutOfMemoryError:
            return OOM
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"unknown path {unknown[0]!r}: choose from {', '.join(PATHS)}", file=sys.stderr)
        return 2
    tiny = args.tiny or not torch.cuda.is_available()
    if tiny:
        blocks, note = 2, "tiny shape (no CUDA GPU or --tiny: figures are not GPU figures)"
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        blocks, estimate = largest_blocks(total)
        note = (f"{blocks} LLaMA-7B blocks: estimate {estimate / 2**30:.1f} of {total / 2**30:.1f} GiB on "
                f"{torch.cuda.get_device_name(0)}")
    print(f"{note}; micro-batch {MICRO}, ZeRO-1, accumulation {ACCUMULATION}, {WARMUP} warm-up + {TIMED} timed steps "
          "per path", flush=True)
    started, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            if time.monotonic() - started > args.budget_s:
                results[path] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            code, found = run_path(path, MICRO, blocks, tiny, Path(scratch))
            if code == OOM:
                code, found = run_path(path, MICRO // 2, blocks, tiny, Path(scratch))
            results[path] = found if code != OOM else {"failed": "out of memory at micro-batch 1"}
            print(f"{path}: {results[path]}", flush=True)
    print(table(results))
    agree = all(r["masking"]["agrees"] for r in results.values() if "masking" in r)
    print(f"masking check: every path {'agrees with' if agree else 'does NOT agree with'} the fp32 dense-mask "
          f"reference; {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"note": note, "results": results, "masking_agrees": agree}, indent=1))
    failed = [p for p, r in results.items() if "failed" in r]
    return 1 if failed or not agree else 0


if __name__ == "__main__":
    sys.exit(main())
