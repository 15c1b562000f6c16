"""Process-group setup for every way a run is started, and the few collectives the trainer needs.

The `deepspeed` launcher and `torchrun` set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. Slurm's `srun` sets none of them (DeepSpeed would fall back to MPI discovery and
fail), so they are derived from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the job's node list.
A plain `python launch/cpt.py` is a world of one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int


def free_port() -> int:
    """A TCP port free on this host now (for a master port or a launcher)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`node[01-04],gpu7` -> `node01`), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables derived from an `srun` task's environment ({} outside srun)."""
    if "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")),
        # stable across a requeue of the same job, different for jobs sharing a node
        "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_PORT + 1 + job % 20000),
    }


def prepare_environment() -> WorldInfo:
    """Fill in the torch.distributed variables for srun or a single process; returns who we are."""
    os.environ.update(slurm_environment(os.environ))
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    return WorldInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


class RendezvousError(ValueError):
    """The ranks could not meet within the timeout (a user-facing setup error: exit code 2, one line)."""


def on_gpu() -> bool:
    """Whether this rank trains on its GPU. DS_ACCELERATOR=cpu puts DeepSpeed on the CPU (the tests, `make demo`)
    and the model and process group follow it where a GPU is visible too: DeepSpeed's launcher sets
    CUDA_VISIBLE_DEVICES=0,1,... for CPU ranks as well, which would send rank 1 to a `cuda:1` a one-GPU machine
    lacks."""
    return os.environ.get("DS_ACCELERATOR") != "cpu" and torch.cuda.is_available()


STALE_BUILD_LOCK_MINUTES = 10.0


def clear_stale_build_locks(max_age_minutes: float = STALE_BUILD_LOCK_MINUTES) -> list[Path]:
    """Remove the `lock` files torch's JIT extension builder leaves when its process is killed mid-build (DeepSpeed
    builds its CPU shm_comm op at the first launch): every later launch would wait on such a lock forever,
    silently. A build takes a minute or two, so a lock older than `max_age_minutes` has no builder left."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        with contextlib.suppress(FileNotFoundError):  # a build that just finished took its lock away
            age = time.time() - lock.stat().st_mtime
            if age > max_age_minutes * 60:
                lock.unlink()
                removed.append(lock)
                print(f"removed {lock}, {age / 60:.0f} minutes old: a build of {lock.parent.name} was killed before "
                      "it finished; it is built again now", flush=True)
    return removed


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """The process group, with `timeout_minutes` for any collective (torch's default for NCCL is 10),
    meeting included: a master that cannot be reached, or ranks that never arrive, end in a
    RendezvousError naming the master's address and this rank's host, not in a hang."""
    from datetime import timedelta

    import deepspeed  # heavy; imported only once the run is known to be valid

    clear_stale_build_locks()
    try:
        deepspeed.init_distributed(dist_init_required=True, timeout=timedelta(minutes=timeout_minutes))
        if on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        unlink_shared_memory_buffer()  # also the first collective: every rank's transport is connected
    except dist.DistError as err:
        raise RendezvousError(rendezvous_failure(err, timeout_minutes)) from err
    except RuntimeError as err:
        if "connectFullMesh" not in str(err):  # gloo's pairs could not connect within the timeout
            raise
        raise RendezvousError(rendezvous_failure(err, timeout_minutes)) from err


def rendezvous_failure(err: Exception, timeout_minutes: float) -> str:
    master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    rank, world_size, host = os.environ.get("RANK"), os.environ.get("WORLD_SIZE"), socket.gethostname()
    cause = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    if rank == "0":
        where = (f"rank 0 on {host} waited {timeout_minutes:g} min (distributed.timeout_minutes) at the master "
                 f"{master} for the other {int(world_size) - 1} rank(s), in vain: check that every node started "
                 f"its ranks and can reach {master}")
    else:
        where = (f"rank {rank} of {world_size} on {host} could not join the master {master} within "
                 f"{timeout_minutes:g} min (distributed.timeout_minutes): check that the master's node is up, that "
                 f"its name resolves to an address {host} can reach, and that the port is open")
    return (f"{where}; raise distributed.timeout_minutes if some ranks start much later than others, and set "
            f"GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME if the nodes have several interfaces ({cause})")


def unlink_shared_memory_buffer() -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one host) gives each rank a 69 MB buffer in /dev/shm that
    it never unlinks: every CPU launch would leave its buffers in memory until reboot. Each rank maps every
    rank's buffer before init returns, so after a barrier each unlinks its own; the memory is freed when
    the last process exits."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def shutdown_distributed() -> None:
    """All ranks leave together and close the process group. A process that exits with the group still
    open can abort in gloo's threads at exit ("terminate called without an active exception", seen
    across nodes), turning exit code 75 or 0 into 134."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (also a barrier)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
