"""launch/cpt.py, recording what every zero-shot evaluation during training scored.

  deepspeed tests/scripts/cpt_recording_zeroshot.py [cpt.py arguments]

Rank 0 appends one JSON line per evaluation to <output_dir>/zeroshot_loglikelihoods.jsonl: every
log-likelihood request as [context ids, continuation ids, log-likelihood, greedy], after the ranks'
shares were all-gathered. The tests compare them with one process scoring the same model.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from training.evaluation.zeroshot import ShardedLM

RECORD = "zeroshot_loglikelihoods.jsonl"
output_dir = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")))
original = ShardedLM._loglikelihood_tokens


def recording(self, requests, **kwargs):
    results = original(self, requests, **kwargs)
    if os.environ.get("RANK", "0") == "0":
        rows = [[list(request[1]), list(request[2]), ll, greedy] for request, (ll, greedy) in zip(requests, results, strict=True)]
        with open(output_dir / RECORD, "a") as handle:
            handle.write(json.dumps(rows) + "\n")
    return results


ShardedLM._loglikelihood_tokens = recording
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "cpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
