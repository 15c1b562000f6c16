"""launch/cpt.py, except that the given optimizer steps see NaN activations, as corrupt data would give.

  python tests/scripts/cpt_with_nonfinite_steps.py --nan-steps=3,5,6,7 [cpt.py arguments]

Fault injection for the bad-step test: the input embeddings' output is multiplied by NaN in every forward
pass of those steps, so their loss and gradients are non-finite.
"""

import runpy
import sys
from pathlib import Path

from training.trainer import Trainer

flag = next(a for a in sys.argv if a.startswith("--nan-steps="))
sys.argv.remove(flag)
poisoned = {int(step) for step in flag.split("=", 1)[1].split(",")}
original_train_step = Trainer.train_step


def poisoned_train_step(self, batches):
    if not hasattr(self, "_poison"):
        def poison(module, args, output):
            return output * float("nan") if self.step + 1 in poisoned else output

        self._poison = self.engine.module.get_input_embeddings().register_forward_hook(poison)
    return original_train_step(self, batches)


Trainer.train_step = poisoned_train_step
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "cpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
