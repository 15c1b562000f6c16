"""launch/cpt.py, except that one rank stalls at the start of one step, as a rank stuck on a slow disk, a
bad NIC or a straggling GPU would, until every rank's watchdog has dumped its stacks for that step.

  deepspeed tests/scripts/cpt_with_a_slow_rank.py --slow=<rank>:<step> [cpt.py arguments]

Fault injection for the hang-watchdog test: the other ranks wait for it in a collective. The stall ends on
the event the test waits for (the stack files in <output_dir>/watchdog/step_N/), not after a fixed time
that a loaded machine could outrun; it gives up after 10 minutes.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from training.run_dir import RunDir, tag_for
from training.trainer import Trainer

flag = next(a for a in sys.argv if a.startswith("--slow="))
sys.argv.remove(flag)
slow_rank, slow_step = flag.split("=", 1)[1].split(":")
output_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir="))
original_train_step = Trainer.train_step


def slow_train_step(self, batches):
    if self.step + 1 == int(slow_step) and os.environ.get("RANK") == slow_rank:
        stacks = RunDir(Path(output_dir)).watchdog / tag_for(int(slow_step))
        expected = {f"rank_{rank:05d}.txt" for rank in range(self.world_size)}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not expected <= {p.name for p in stacks.glob("rank_*.txt")}:
            time.sleep(0.1)
    return original_train_step(self, batches)


Trainer.train_step = slow_train_step
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "cpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
