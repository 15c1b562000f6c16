"""Throughput of the CPT path on one GPU, every attention and kernel path side by side, in one go.

  python tests/benchmarks/bench_gpu.py                 # on a CUDA GPU: the LLaMA-7B shape with 26 blocks
  python tests/benchmarks/bench_gpu.py --tiny          # a tiny shape, anywhere (the test suite runs it on the CPU)
  python tests/benchmarks/bench_gpu.py --paths varlen,varlen+liger --json results.json

The GPU shape is the paper's 20%-pruned LLaMA-7B (26 of 32 blocks: hidden 4096, MLP 11008, 32
heads, vocabulary 32000, 5.5B parameters) with random weights, bf16, sequences of 2048 tokens packed
from documents of random lengths, one GPU, DeepSpeed ZeRO-1 with fp32 gradient accumulation (the
recipes' settings, `training/trainer.zero_settings`), torch's AdamW, gradient accumulation 4. Built
for one H200 within 8 minutes; on an 80 GB H100 the micro-batch search settles lower.

Paths: `sdpa` (transformers' dense document mask), `varlen` (the loader's flattened batches and
PyTorch's flash varlen kernel), `flex_attention`, `flash_attention_2` (if flash-attn is installed),
`varlen+liger` (Liger's fused kernels), `varlen+compile` (torch.compile of each block). Each runs in
its own process: clean peak memory, and Liger's module-level patches stay there. The largest
micro-batch that fits is searched once with `varlen` (halving from 4 on an out-of-memory error) and
used for every path; a path that does not fit there is retried at half.

Reported per path: micro-batch, tokens/s and MFU (PaLM's model FLOPs, `training/throughput.py`,
against the device's dense bf16 peak) over the steps after 2 warm-up steps, peak memory, and the
losses of the first steps, which must agree across paths (same seed, weights and batches; the exit
code is 1 when they do not). A path the machine cannot run is listed with the reason (a missing
package is named). It installs nothing: it needs torch, transformers and deepspeed, and liger-kernel
or flash-attn for those paths.
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
PATHS = {"sdpa": ("sdpa", "none", False), "varlen": ("varlen", "none", False),
         "flex_attention": ("flex_attention", "none", False), "flash_attention_2": ("flash_attention_2", "none", False),
         "varlen+liger": ("varlen", "liger", False), "varlen+compile": ("varlen", "none", True)}
SHAPES = {  # hidden, MLP, blocks, heads, KV heads, vocabulary, sequence length
    "gpu": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=26, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, seq_len=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, seq_len=128),
}
ACCUMULATION, WARMUP, TIMED = 4, 2, 4
OOM = 3  # a child's exit code when the micro-batch does not fit


def missing_packages() -> list[str]:
    return [name for name in ("torch", "transformers", "deepspeed") if importlib.util.find_spec(name) is None]


def packed_samples(count: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Packed sequences as PackedSequences returns them: documents of random lengths (mean ~seq/3)."""
    import torch

    from data.nll import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (seq_len,), generator=generator)
        lengths = torch.randint(1, 2 * seq_len // 3, (seq_len,), generator=generator).cumsum(0)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths[lengths < seq_len]])
        labels = input_ids.clone()
        labels[starts[1:]] = IGNORE_INDEX
        reset = torch.zeros(seq_len, dtype=torch.long)
        reset[starts] = starts
        samples.append({"input_ids": input_ids, "labels": labels,
                        "position_ids": torch.arange(seq_len) - torch.cummax(reset, 0).values})
    return samples


def child(path: str, micro: int, shape_name: str, out: Path) -> int:
    """One path in this process: build, train WARMUP + TIMED steps, write the figures to `out`."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data.config import ConfigError, load_config
    from data.loader import collate, to_device
    from data.precision import resolve_device, torch_dtype
    from data.varlen import varlen_collate
    from training.attention import register_varlen, resolve_attention, uses_flat_batches
    from training.config import CPTConfig
    from training.distributed import init_distributed, prepare_environment
    from training.kernels import check_kernels, speed_up
    from training.optim import build_optimizer
    from training.preflight import RunPlan
    from training.throughput import flops_per_token, peak_flops, peak_memory_gb
    from training.trainer import deepspeed_config

    attn, kernels, compile_blocks = PATHS[path]
    shape = dict(SHAPES[shape_name])
    seq_len = shape.pop("seq_len")
    device = resolve_device()
    precision = "bf16" if device.type == "cuda" else "fp32"
    config = load_config(CPTConfig, None, [f"global_batch={micro * ACCUMULATION}", f"micro_batch={micro}",
                                           "zero_stage=1", f"precision={precision}", "train_steps=1000",
                                           f"attn_implementation={attn}", f"kernels={kernels}",
                                           f"compile={compile_blocks}", "optimizer.lr=1e-4"])
    try:
        attention = resolve_attention(attn, device, precision)
        check_kernels(kernels, device)
    except ConfigError as err:
        out.write_text(json.dumps({"refused": str(err)}))
        return 0
    world = prepare_environment()
    init_distributed()
    plan = RunPlan(world, "random", ACCUMULATION, 1000, seq_len, precision, device, {}, None, False, attention)
    register_varlen()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**shape, max_position_embeddings=seq_len, tie_word_embeddings=False),
            attn_implementation=attention, dtype=torch_dtype(precision))
    model.config.use_cache = False
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
    out.write_text(json.dumps({
        "micro_batch": micro, "tokens_per_s": tokens_per_s, "step_s": timed,
        "mfu": flops_per_token(model, seq_len) * tokens_per_s / peak if peak else None,
        "peak_memory_gb": peak_memory_gb(device), "losses": losses,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}))
    return 0


def run_path(path: str, micro: int, shape: str, scratch: Path) -> tuple[int, dict]:
    out = scratch / f"{path}-{micro}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # each child is its own one-process world
    result = subprocess.run([sys.executable, __file__, "--child", path, "--micro", str(micro), "--shape", shape,
                             "--out", str(out)], env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode == OOM:
        return OOM, {}
    if result.returncode != 0:
        return result.returncode, {"failed": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                                   f"exit code {result.returncode}"}
    return 0, json.loads(out.read_text())


def table(results: dict[str, dict]) -> str:
    lines = ["| path | micro-batch | tokens/s | MFU | peak memory GB | first losses |", "|---|---|---|---|---|---|"]
    for path, r in results.items():
        if "tokens_per_s" not in r:
            lines.append(f"| {path} | {r.get('refused') or r.get('failed') or r.get('skipped')} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {path} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_gb']:.1f} | "
                     + ", ".join(f"{loss:.4f}" for loss in r["losses"][:3]) + " |")
    return "\n".join(lines)


def losses_agree(results: dict[str, dict], tolerance: float) -> bool:
    firsts = [r["losses"][0] for r in results.values() if "losses" in r]
    return not firsts or max(firsts) - min(firsts) <= tolerance * max(abs(f) for f in firsts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (default on a machine without CUDA)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the paths left after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        print(f"missing packages: {', '.join(missing)} (install them into this environment; nothing is installed "
              "by this script)", file=sys.stderr)
        return 2
    if args.child:
        import torch

        try:
            return child(args.child, args.micro, args.shape, args.out)
        except torch.OutOfMemoryError:
            return OOM
    import torch

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"unknown path {unknown[0]!r}: choose from {', '.join(PATHS)}", file=sys.stderr)
        return 2
    shape = "tiny" if args.tiny or not torch.cuda.is_available() else "gpu"
    print(f"shape {shape}: {SHAPES[shape]}; ZeRO-1, accumulation {ACCUMULATION}, {WARMUP} warm-up + {TIMED} timed "
          f"steps per path" + ("" if shape == "gpu" else " (no CUDA GPU or --tiny: figures are not GPU figures)"))
    started, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory() as scratch:
        micro = 4 if shape == "gpu" else 2
        while True:  # the largest micro-batch that fits, found with the varlen path (or the first path asked for)
            probe = "varlen" if "varlen" in paths else paths[0]
            code, found = run_path(probe, micro, shape, Path(scratch))
            if code != OOM or micro == 1:
                break
            print(f"micro-batch {micro} does not fit: trying {micro // 2}")
            micro //= 2
        results[probe] = found if code != OOM else {"failed": "out of memory at micro-batch 1"}
        print(f"{probe}: {results[probe]}", flush=True)
        for path in paths:
            if path in results:
                continue
            if time.monotonic() - started > args.budget_s:
                results[path] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            code, found = run_path(path, micro, shape, Path(scratch))
            if code == OOM and micro > 1:
                code, found = run_path(path, micro // 2, shape, Path(scratch))
            results[path] = found if code != OOM else {"failed": "out of memory"}
            print(f"{path}: {found}", flush=True)
    print(table(results))
    agree = losses_agree(results, 0.01 if shape == "gpu" else 1e-5)
    print(f"first-step losses {'agree' if agree else 'DIFFER'} across paths; {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "results": results, "losses_agree": agree}, indent=1))
    failed = [p for p, r in results.items() if "failed" in r]
    return 1 if failed or not agree else 0


if __name__ == "__main__":
    sys.exit(main())
