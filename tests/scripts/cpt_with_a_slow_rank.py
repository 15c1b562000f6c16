"""launch/cpt.py, except that one rank sleeps at the start of one step, as a rank stuck on a slow
disk, a bad NIC or a straggling GPU would.

  deepspeed tests/scripts/cpt_with_a_slow_rank.py --slow=<rank>:<step>:<seconds> [cpt.py arguments]

Fault injection for the hang-watchdog test: the other ranks wait for it in a collective.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from training.trainer import Trainer

flag = next(a for a in sys.argv if a.startswith("--slow="))
sys.argv.remove(flag)
slow_rank, slow_step, seconds = flag.split("=", 1)[1].split(":")
original_train_step = Trainer.train_step


def slow_train_step(self, batches):
    if self.step + 1 == int(slow_step) and os.environ.get("RANK") == slow_rank:
        time.sleep(float(seconds))
    return original_train_step(self, batches)


Trainer.train_step = slow_train_step
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "cpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
