"""Benchmark of the continued-pretraining trainer's per-step overhead against a bare DeepSpeed loop.

Both run side by side in this run, alternately (ours, bare, ours, bare) to spread the noise of a
shared machine, on 2 CPU processes (gloo, one thread each), DeepSpeed ZeRO-2, fp32, the same
~19M-parameter LLaMA-shaped random model (SmolLM2's tokenizer and vocabulary, tied embeddings),
the same packed C4 batches (seq 256, micro-batch 2, global batch 8 = accumulation 2 x 2 ranks,
same seed and order) and the same AdamW hyper-parameters at a constant learning rate.

1. Ours: `deepspeed launch/cpt.py` (training/trainer.py) with validation, periodic checkpoints and
   export off, metrics.jsonl + TensorBoard on. Seconds per optimizer step two ways: `perf.step_s`
   as the trainer reports it (forward/backward/step only), and the wall time between consecutive
   steps' TensorBoard records (the whole loop iteration: also the loss/flags all-reduce, the grad
   norm, metrics.jsonl and TensorBoard writes).
2. Baseline: this file run with `--bare` under the same launcher: from_pretrained, torch AdamW as
   the client optimizer, deepspeed.initialize, the same PackedLoader, and a loop of
   engine(**batch).loss / backward / step with no logging, checkpointing or validation.

Reported: median s/step after 3 warm-up steps, the overhead ours/bare - 1 against the 5% target
(printed, never asserted), and the final-step training loss of both (same data -> close losses).
Exits non-zero only if a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.config import load_config  # noqa: E402
from data.embedded import smollm2_path  # noqa: E402
from data.packed import PackedLoader, PackedSequences  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
RANKS, SEQ_LEN, MICRO_BATCH, GLOBAL_BATCH, STEPS, WARMUP, ROUNDS = 2, 256, 2, 8, 15, 3, 2
LR, BETAS, WEIGHT_DECAY, EPS, GRAD_CLIP, SEED = 1e-3, (0.9, 0.95), 0.1, 1e-8, 1.0, 1234
TARGET = 0.05


# ---- the baseline, run under the deepspeed launcher --------------------------------------------
def bare_loop(model_dir: str, tokens: str, out: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    accumulation = GLOBAL_BATCH // (MICRO_BATCH * world)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    exempt = [p for p in model.parameters() if p.ndim < 2]  # the trainer's weight-decay exemptions
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": exempt, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
              "gradient_accumulation_steps": accumulation, "gradient_clipping": GRAD_CLIP,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dataset = PackedSequences(Path(tokens), SEQ_LEN, "train")
    batches = iter(PackedLoader(dataset, GLOBAL_BATCH, MICRO_BATCH, world, rank, SEED, 0))
    step_s, losses = [], []
    for _ in range(STEPS):
        started = time.perf_counter()
        for _ in range(accumulation):
            loss = engine(**next(batches), use_cache=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        step_s.append(time.perf_counter() - started)
    per_step = torch.stack(losses).view(STEPS, accumulation).mean(1).double()
    dist.all_reduce(per_step)  # after the timed loop: rank-averaged loss per step, as the trainer logs it
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": step_s, "loss": (per_step / world).tolist()}))


# ---- the driver ----------------------------------------------------------------------------------
def build_inputs(work: Path) -> tuple[Path, Path, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    prepare(load_config(PrepareConfig, None, ["inputs=[embedded:c4_demo.jsonl]", f"output_dir={work / 'tokens'}",
                                              f"tokenizer={work / 'model'}", "validation_fraction=0.1"]))
    return work / "model", work / "tokens", sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: Path, args: list[str], name: str) -> float:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [str(DEEPSPEED), "--num_gpus", str(RANKS), "--master_port", str(free_port()), str(script), *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        print(f"{name} run failed with exit code {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
              f"--- stderr\n{result.stderr[-6000:]}", file=sys.stderr)
        sys.exit(1)
    return time.perf_counter() - started


def run_ours(model: Path, tokens: Path, run_dir: Path) -> dict:
    elapsed = launch(ROOT / "launch" / "cpt.py", [
        f"model={model}", f"data.path={tokens}", f"output_dir={run_dir}", f"data.seq_len={SEQ_LEN}",
        f"global_batch={GLOBAL_BATCH}", f"micro_batch={MICRO_BATCH}", f"train_steps={STEPS}", "zero_stage=2",
        "precision=fp32", "data.num_workers=0", f"data.seed={SEED}", f"optimizer.lr={LR}",
        f"optimizer.betas=[{BETAS[0]},{BETAS[1]}]", f"optimizer.weight_decay={WEIGHT_DECAY}",
        f"optimizer.eps={EPS}", f"optimizer.grad_clip={GRAD_CLIP}", "schedule.decay=constant",
        "schedule.warmup_steps=0", "validation.every_steps=0", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0", "checkpoint.export_at_end=false", "logging.tensorboard=true"], "ours")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "perf.step_s" in r}
    assert sorted(steps) == list(range(1, STEPS + 1)), f"metrics.jsonl has steps {sorted(steps)}"
    return {"step_s": [steps[s]["perf.step_s"] for s in range(1, STEPS + 1)],
            "loop_s": loop_intervals(run_dir / "tensorboard"),
            "loss": [steps[s]["train.loss"] for s in range(1, STEPS + 1)], "elapsed": elapsed}


def loop_intervals(tensorboard_dir: Path) -> list[float]:
    """Wall time between consecutive steps' TensorBoard records (the whole loop iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    wall = {e.step: e.wall_time for e in events.Scalars("perf/step_s")}
    return [wall[s] - wall[s - 1] for s in range(2, STEPS + 1)]  # interval s-1 -> s: the iteration of step s


def run_bare(model: Path, tokens: Path, out: Path) -> dict:
    elapsed = launch(Path(__file__).resolve(), ["--bare", "--model", str(model), "--tokens", str(tokens),
                                                "--out", str(out)], "bare")
    return {**json.loads(out.read_text()), "elapsed": elapsed}


def median_after_warmup(runs: list[dict], key: str, first_step: int = 1) -> float:
    return statistics.median(t for run in runs for step, t in enumerate(run[key], first_step) if step > WARMUP)


def main() -> None:
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="shorten-bench-cpt-"))
    try:
        model, tokens, params = build_inputs(work)
        ours, bare = [], []
        for round_ in range(ROUNDS):
            ours.append(run_ours(model, tokens, work / f"ours-{round_}"))
            bare.append(run_bare(model, tokens, work / f"bare-{round_}.json"))

        print(f"CPT step time: {params / 1e6:.1f}M-parameter Llama (SmolLM2 vocabulary, tied), {RANKS} CPU ranks x "
              f"1 thread, ZeRO-2, fp32, seq {SEQ_LEN}, micro-batch {MICRO_BATCH}, global batch {GLOBAL_BATCH}, "
              f"{STEPS} steps x {ROUNDS} rounds alternating, median after {WARMUP} warm-up steps")
        ours_step = median_after_warmup(ours, "step_s")
        ours_loop = median_after_warmup(ours, "loop_s", first_step=2)
        bare_step = median_after_warmup(bare, "step_s")
        for round_ in range(ROUNDS):
            print(f"  round {round_ + 1}: ours {median_after_warmup(ours[round_:round_ + 1], 'step_s'):.3f} s/step "
                  f"(loop {median_after_warmup(ours[round_:round_ + 1], 'loop_s', 2):.3f})   bare "
                  f"{median_after_warmup(bare[round_:round_ + 1], 'step_s'):.3f} s/step   process wall "
                  f"{ours[round_]['elapsed']:.0f} s / {bare[round_]['elapsed']:.0f} s")
        print(f"  {'':34}{'s/step':>8}{'steps/s':>9}{'vs bare':>9}")
        for label, value in (("bare DeepSpeed loop", bare_step), ("ours, perf.step_s", ours_step),
                             ("ours, whole loop (TensorBoard)", ours_loop)):
            print(f"  {label:34}{value:8.3f}{1 / value:9.3f}{value / bare_step - 1:+9.1%}")
        for label, value in (("perf.step_s", ours_step), ("whole loop", ours_loop)):
            overhead = value / bare_step - 1
            print(f"  overhead ({label}): {overhead:+.1%}  -> {'under' if overhead < TARGET else 'OVER'} the "
                  f"{TARGET:.0%} target")
        for round_ in range(ROUNDS):
            diff = max(abs(a - b) for a, b in zip(ours[round_]["loss"], bare[round_]["loss"], strict=True))
            print(f"  round {round_ + 1} loss step 1 -> {STEPS}: ours {ours[round_]['loss'][0]:.4f} -> "
                  f"{ours[round_]['loss'][-1]:.4f}   bare {bare[round_]['loss'][0]:.4f} -> "
                  f"{bare[round_]['loss'][-1]:.4f}   max per-step difference {diff:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", action="store_true", help="run the baseline loop (under the deepspeed launcher)")
    parser.add_argument("--model")
    parser.add_argument("--tokens")
    parser.add_argument("--out")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_loop(args.model, args.tokens, args.out)
    else:
        main()
