"""Where each rank runs, as launch/cpt.py sees it: the process-group setup of training/distributed.py,
then rank 0 writes every rank's identity to the JSON file named by the first argument.

  srun python tests/scripts/rank_report.py <out.json>
"""

import json
import os
import socket
import sys
from pathlib import Path

from training.distributed import (
    all_gather_object,
    init_distributed,
    prepare_environment,
    shutdown_distributed,
)

world = prepare_environment()
init_distributed(timeout_minutes=1)
rows = all_gather_object({"rank": world.rank, "local_rank": world.local_rank, "world_size": world.world_size,
                          "host": socket.gethostname(), "master_addr": os.environ["MASTER_ADDR"],
                          "master_port": os.environ["MASTER_PORT"]})
if world.rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(rows))
shutdown_distributed()
