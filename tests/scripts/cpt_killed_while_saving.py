"""launch/cpt.py, except that rank 0 dies by SIGKILL halfway through writing one checkpoint file.

  deepspeed tests/scripts/cpt_killed_while_saving.py --kill-at-step=<step> [cpt.py arguments]

Fault injection for the checkpoint-commit test: when torch.save writes the optimizer states of the
checkpoint for <step>, rank 0 writes half of the bytes and kills itself, as a node failure would.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

flag = next(a for a in sys.argv if a.startswith("--kill-at-step="))
sys.argv.remove(flag)
kill_step = int(flag.split("=", 1)[1])
original_save = torch.save


def save_then_die(obj, f, *args, **kwargs):
    target = str(f)
    if f".tmp-step_{kill_step:08d}" in target and "optim_states" in target and os.environ.get("RANK") == "0":
        original_save(obj, f, *args, **kwargs)
        size = Path(target).stat().st_size
        os.truncate(target, size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return original_save(obj, f, *args, **kwargs)


torch.save = save_then_die
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "cpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
