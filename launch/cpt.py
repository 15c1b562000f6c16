"""Continued pretraining of a pruned model with DeepSpeed ZeRO (the paper's recipe by default).

  deepspeed --num_gpus 8 launch/cpt.py --config configs/cpt/<recipe>.yaml [key=value ...]
  torchrun --nproc_per_node 8 launch/cpt.py --config ...     srun python launch/cpt.py --config ...

Run it again with the same output_dir and it resumes from the latest committed checkpoint, with
the data position restored exactly (on another world size too, through DeepSpeed's universal
checkpoint format). SIGUSR1 or SIGTERM on any rank: the ranks agree at the next step boundary,
commit a checkpoint and exit with code 75 (EX_TEMPFAIL, "try again"). Exit codes: 0 training
complete, 2 bad config or inputs, or ranks that could not meet within distributed.timeout_minutes
(nothing trained), 3 too many non-finite steps in a row (the last good checkpoint is kept), 75
stopped by a signal after checkpointing.
"""

from __future__ import annotations

import sys

from training import console, stop_signals

stop_signals.install()  # first: SIGUSR1 would kill the process while torch and DeepSpeed import
console.quiet_other_ranks()  # before the libraries load: one rank prints

from data.cli import cli_config, run_main  # noqa: E402
from training.config import CPTConfig  # noqa: E402


def main(argv: list[str]) -> int:
    config = cli_config(CPTConfig, __doc__, argv)  # before any heavy import: --help and bad keys answer at once
    from training.cpt import build_cpt_trainer, plan_cpt
    from training.distributed import init_distributed, prepare_environment, shutdown_distributed

    world = prepare_environment()
    plan = plan_cpt(config, world)  # every cheap check, before any process group or model exists
    init_distributed(config.distributed.timeout_minutes)
    outcome = build_cpt_trainer(config, plan, should_stop=stop_signals.requested).train()
    shutdown_distributed()
    return stop_signals.exit_code(outcome, world.rank)


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
