"""LoRA on Alpaca (the paper's recipe by default) after pruning or continued pretraining.

  python launch/lora.py --config configs/lora/paper.yaml model=outputs/cpt/x/exports/step_N
  deepspeed --num_gpus 8 launch/lora.py --config ...      # data-parallel, same global batch of 64

Writes <output_dir>/adapter (PEFT format) and <output_dir>/merged (a plain Hugging Face checkpoint)
when training completes. Rerun with the same output_dir to resume from the latest committed
checkpoint. SIGUSR1/SIGTERM: checkpoint, then exit code 75; 2 = bad config or data, or ranks that could
not meet within distributed.timeout_minutes; 3 = too many non-finite steps.
"""

from __future__ import annotations

import sys

from training import console, stop_signals

stop_signals.install()  # first: SIGUSR1 would kill the process while torch and DeepSpeed import
console.quiet_other_ranks()  # before the libraries load: one rank prints

from data.cli import cli_config, run_main  # noqa: E402
from training.config import LoRAConfig  # noqa: E402


def main(argv: list[str]) -> int:
    config = cli_config(LoRAConfig, __doc__, argv)  # before any heavy import: --help and bad keys answer at once
    from training.distributed import init_distributed, prepare_environment, shutdown_distributed
    from training.lora import build_lora_trainer, plan_lora

    world = prepare_environment()
    plan = plan_lora(config, world)  # every cheap check, before any process group or model exists
    init_distributed(config.distributed.timeout_minutes)
    outcome = build_lora_trainer(config, plan, should_stop=stop_signals.requested).train()
    shutdown_distributed()
    return stop_signals.exit_code(outcome, world.rank)


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
