"""What a distributed run prints: rank 0 speaks, and known noise is kept out.

Called by the entry scripts first thing, before torch, transformers, datasets or lm-eval are
imported: tqdm reads `TQDM_DISABLE` and transformers/datasets read their verbosity variables when
they load. The rank comes from the launcher's environment (`RANK` from deepspeed or torchrun,
`SLURM_PROCID` under srun), which is all there is that early.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # every tqdm bar: lm-eval's requests, tokenizing, "Loading weights"
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def launch_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def quiet_other_ranks() -> None:
    """Ranks other than 0 print only errors; every rank drops two deprecation warnings that libraries
    repeat per rank and step (DeepSpeed's use of an old torch.distributed name, PEFT's question to
    transformers under an old name)."""
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if launch_rank() == 0:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in ("lm_eval", "deepspeed", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
