"""Submit a stage to Slurm: write an sbatch script from launch/slurm/, show it, submit it.

  python launch/submit.py cpt --config configs/cpt/vicuna7b_ppl_20.yaml --nodes 8 --gpus-per-node 8
  python launch/submit.py prepare_data --config configs/data/slimpajama.yaml --array 64
  python launch/submit.py eval --config configs/eval/paper.yaml --after 1234 model=...   # afterok:1234
  python launch/submit.py cpt --config ... --dry-run                                     # show only
  python launch/submit.py chain --config configs/chain/vicuna7b_ppl_20_teacher_correction.yaml

Stages: prune, prepare_data, cpt, eval, lora, quantize; trailing key=value overrides go to the stage.
chain submits the jobs of a chain recipe (configs/chain/) in order, each after the one before it
succeeds (afterok); a job's overrides may name an earlier job's product as ${job}: a prune's or
tokenization's output_dir, a CPT run's final export, a LoRA run's merged model, an eval's or
quantization's output_dir.
cpt and lora jobs get --requeue, --signal=USR1@<signal-seconds> (to the tasks) and
--open-mode=append: on the signal the ranks commit a checkpoint and exit 75, the job requeues
itself (also after a SIGTERM to the batch shell), and the rerun resumes from the latest
committed checkpoint.
prepare_data with --array N runs N array tasks (shard_index = the task id) and a merge job
after them. --parsable prints only the job id, for chaining (`--after $(... --parsable)`).
Errors (no sbatch, a config the stage refuses, more GPUs than the partition has, a refused
submission) exit with code 2 before or instead of submitting.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Literal, NamedTuple

from data.batch_layout import accumulation_steps
from data.cli import run_main
from data.config import ConfigError, load_config
from training import stop_signals
from training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "launch" / "slurm"


class Stage(NamedTuple):
    script: str
    config_class: str  # module:Class, imported only for the stage submitted


STAGES = {"prune": Stage("prune.py", "pruning.config:PruneConfig"),
          "prepare_data": Stage("prepare_data.py", "data.prepare:PrepareConfig"),
          "cpt": Stage("cpt.py", "training.config:CPTConfig"),
          "lora": Stage("lora.py", "training.config:LoRAConfig"),
          "eval": Stage("eval.py", "training.evaluation.config:EvalConfig"),
          "quantize": Stage("quantize.py", "training.quantization.config:QuantizeConfig")}
REQUEUED_STAGES = ("cpt", "lora")
CHAIN = "chain"
REFERENCE = re.compile(r"\$\{([^}]*)\}")


@dataclass
class ChainJob:
    """One job of a chain recipe: a stage, its recipe and overrides, and the allocation it needs."""

    name: str
    stage: Literal["prune", "prepare_data", "cpt", "lora", "eval", "quantize"]
    config: Path
    overrides: list[str] = field(default_factory=list)
    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    time: str | None = None

    __field_docs__ = {"overrides": "key=value for the stage; ${job} is an earlier job's product",
                      "nodes": "unset: the command line's --nodes (likewise gpus_per_node, tasks_per_node, time)"}


@dataclass
class ChainConfig:
    """Jobs submitted in order, each after the previous one succeeds."""

    jobs: list[ChainJob] = field(default_factory=list)

    def validate(self) -> None:
        names = [job.name for job in self.jobs]
        if not names:
            raise ConfigError("jobs: a chain needs at least one job")
        bad = [name for name in names if not re.fullmatch(r"[A-Za-z][\w-]*", name)]
        if bad:
            raise ConfigError(f"jobs: name {bad[0]!r} must start with a letter and hold only letters, digits, _ and -")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"jobs: the name {repeated[0]} is used twice; give every job its own name")


class SubmitError(ValueError):
    """The job cannot be submitted as asked."""


def stage_config(stage: str, config: Path, overrides: list[str]):
    """Load the stage's own config now, so a bad recipe fails here rather than in the queue."""
    module, name = STAGES[stage].config_class.split(":")
    return load_config(getattr(importlib.import_module(module), name), config, overrides)


def product(stage: str, config) -> Path:
    """What a finished job of the stage leaves for the next one: the path a later job's ${name} stands for."""
    if stage == "cpt":
        return RunDir(config.output_dir).export(config.total_steps())  # written when the last step is done
    if stage == "lora":
        return RunDir(config.output_dir).merged
    return Path(config.output_dir)


def resolve_references(override: str, products: dict[str, Path], job: str) -> str:
    def path_of(match: re.Match) -> str:
        if match.group(1) not in products:
            raise ConfigError(f"job {job}: {override!r} names ${{{match.group(1)}}}, which is not an earlier job of "
                              f"the chain (earlier jobs: {', '.join(products) or 'none'})")
        return str(products[match.group(1)])

    return REFERENCE.sub(path_of, override)


def check_world(stage: str, config, world_size: int) -> None:
    """The batch rule for nodes x tasks per node, before anything waits in the queue."""
    if stage in REQUEUED_STAGES:
        accumulation_steps(config.global_batch, config.micro_batch, world_size)


def slurm_time_seconds(limit: str) -> int | None:
    """Seconds of a Slurm time limit (`minutes`, `minutes:seconds`, `hours:minutes:seconds`, `days-hours`,
    `days-hours:minutes`, `days-hours:minutes:seconds`); None for INFINITE/UNLIMITED."""
    if limit.upper() in ("INFINITE", "UNLIMITED", "-1"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if match is None:
        raise SubmitError(f"--time {limit!r} is not a Slurm time limit: use minutes, hours:minutes:seconds or "
                          "days-hours:minutes:seconds")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    if third is not None:  # hours:minutes:seconds
        return (first * 60 + second) * 60 + third
    return first * 60 + (second or 0)  # minutes[:seconds]


def check_signal_time(args: argparse.Namespace) -> None:
    """The stop warning must come after the start: Slurm signals a job whose remaining time is below
    --signal-seconds at once, and again at every check, so each run would stop right after it starts."""
    limit = slurm_time_seconds(args.time)
    if args.stage in REQUEUED_STAGES and limit is not None and args.signal_seconds >= limit:
        raise SubmitError(f"--signal-seconds {args.signal_seconds} is not shorter than --time {args.time} "
                          f"({limit} s): every run would be told to stop as it starts. Lower --signal-seconds "
                          "(one step plus a checkpoint save) or raise --time")


def partition_gpus(partition: str | None) -> int:
    """GPUs per node of the partition (the smallest over its nodes), from sinfo's GRES column."""
    args = ["sinfo", "-h", "-o", "%P %G"] + (["-p", partition] if partition else [])
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sinfo failed: {result.stderr.strip()}")
    rows = [line.split(maxsplit=1) for line in result.stdout.splitlines() if line.strip()]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")] or rows  # the default partition
    if not rows:
        raise SubmitError(f"partition {partition!r} not found by sinfo: pick one of `sinfo -s` with --partition")
    counts = []
    for _, gres in rows:
        found = re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres)
        counts.append(sum(map(int, found)) if found else 0)
    return min(counts)


def stage_command(stage: str, config: Path, overrides: list[str], extra: list[str] = ()) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, f"launch/{STAGES[stage].script}", "--config", str(config),
                                             *overrides, *extra])


def render(stage: str, args: argparse.Namespace, body: str, job_name: str, directives: list[str]) -> str:
    template = Template((TEMPLATES / "job.sbatch").read_text())
    return template.substitute(
        stage=stage, config=args.config, job_name=job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, log_dir=args.log_dir.resolve(),
        directives="\n".join(f"#SBATCH {d}" for d in directives), workdir=shlex.quote(str(ROOT)),
        omp_threads=args.cpus_per_task, body=body,
        environment="\n".join(f"export {e}" for e in args.env))


def common_directives(args: argparse.Namespace) -> list[str]:
    directives = []
    if args.gpus_per_node:
        directives.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag in ("partition", "account", "qos"):
        if getattr(args, flag):
            directives.append(f"--{flag}={getattr(args, flag)}")
    if args.after:
        directives.append(f"--dependency=afterok:{args.after.replace(',', ':')}")
    return directives + list(args.sbatch_arg)


def scripts_for(stage: str, args: argparse.Namespace, overrides: list[str],
                name: str | None = None) -> list[tuple[str, str]]:
    """(job name, script) pairs in submission order; a later one depends on the one before it."""
    name = name or f"shorten-{stage}-{args.config.stem}"
    directives = common_directives(args)
    if stage in REQUEUED_STAGES:
        body = Template((TEMPLATES / "requeue_on_stop.sh").read_text()).substitute(
            command=stage_command(stage, args.config, overrides), preempted=stop_signals.PREEMPTED_EXIT_CODE)
        directives += ["--requeue", f"--signal=USR1@{args.signal_seconds}"]
        return [(name, render(stage, args, body, name, directives))]
    if stage == "prepare_data" and args.array:
        shard = ["shard_index=$SLURM_ARRAY_TASK_ID", f"num_shards={args.array}"]
        part_body = f"srun {stage_command(stage, args.config, overrides)} {' '.join(shard)}"
        merge_body = f"srun {stage_command(stage, args.config, overrides, ['merge=true', f'num_shards={args.array}'])}"
        return [(name, render(stage, args, part_body, name, directives + [f"--array=0-{args.array - 1}"])),
                (f"{name}-merge", render(stage, args, merge_body, f"{name}-merge", directives))]
    return [(name, render(stage, args, f"srun {stage_command(stage, args.config, overrides)}", name, directives))]


class Job(NamedTuple):
    """A stage to submit: its arguments (allocation, time), overrides, loaded config, and a name for chains."""

    args: argparse.Namespace
    overrides: list[str]
    config: object
    name: str | None = None


def default_tasks(stage: str, gpus_per_node: int) -> int:
    return max(1, gpus_per_node) if stage in REQUEUED_STAGES else 1


def job_arguments(args: argparse.Namespace, job: ChainJob, first: bool) -> argparse.Namespace:
    """The command line's settings with the chain job's own; only the first job waits for --after."""
    settings = {**vars(args), "stage": job.stage, "config": job.config, "array": 0, "after": args.after if first else None}
    settings.update({key: getattr(job, key) for key in ("nodes", "gpus_per_node", "tasks_per_node", "time")
                     if getattr(job, key) is not None})
    job_args = argparse.Namespace(**settings)
    if job_args.tasks_per_node is None:
        job_args.tasks_per_node = default_tasks(job.stage, job_args.gpus_per_node)
    return job_args


def checked_job(args: argparse.Namespace, overrides: list[str], name: str | None = None) -> Job:
    """The stage's config loaded with the overrides and the batch layout checked: a bad recipe fails here."""
    check_signal_time(args)
    config = stage_config(args.stage, args.config, overrides)
    check_world(args.stage, config, args.nodes * args.tasks_per_node)
    return Job(args, overrides, config, name)


def plan_jobs(args: argparse.Namespace, overrides: list[str]) -> list[Job]:
    """The jobs to submit, in order, every config loaded and checked before anything is submitted."""
    if args.stage != CHAIN:
        return [checked_job(args, overrides)]
    if overrides:
        raise SubmitError(f"chain takes no key=value overrides ({overrides[0]}): put them in the jobs of "
                          f"{args.config}")
    jobs, products = [], {}
    for index, job in enumerate(load_config(ChainConfig, args.config).jobs):
        resolved = [resolve_references(override, products, job.name) for override in job.overrides]
        planned = checked_job(job_arguments(args, job, index == 0), resolved, f"shorten-{args.config.stem}-{job.name}")
        products[job.name] = product(job.stage, planned.config)
        jobs.append(planned)
    return jobs


def sbatch_command(script: Path, after: str | None) -> list[str]:
    return ["sbatch", "--parsable"] + ([f"--dependency=afterok:{after}"] if after else []) + [str(script)]


def submit(script: Path, after: str | None) -> str:
    result = subprocess.run(sbatch_command(script, after), capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"Slurm refused {script}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*sorted(STAGES), CHAIN])
    parser.add_argument("--config", type=Path, required=True, help="the stage's YAML recipe (chain: configs/chain/)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0 on CPU partitions)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="processes per node (default: one per GPU for cpt/lora, else 1)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="2-00:00:00", help="time limit per run (the job requeues itself)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--signal-seconds", type=int, default=900,
                        help="USR1 this long before the time limit: one step plus a checkpoint save of the "
                             "paper's 13B model with margin (README: Preemption and failures)")
    parser.add_argument("--array", type=int, default=0, help="prepare_data: number of array tasks (shards)")
    parser.add_argument("--after", help="job id(s), comma-separated: start after they succeed")
    parser.add_argument("--env", action="append", default=[], help="NAME=value exported in the job")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH line, e.g. --exclusive")
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/slurm"))
    parser.add_argument("--dry-run", action="store_true", help="write and show the script, do not submit")
    parser.add_argument("--parsable", action="store_true", help="print only the job id(s)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.tasks_per_node is None and args.stage != CHAIN:  # a chain's jobs default by their own stage
        args.tasks_per_node = default_tasks(args.stage, args.gpus_per_node)
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    jobs = plan_jobs(args, overrides)
    if not args.dry_run:
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found on PATH: run on a Slurm login node, or use --dry-run to only "
                              "write the script")
        available = partition_gpus(args.partition)
        needed = max(job.args.gpus_per_node for job in jobs)
        if needed > available:
            raise SubmitError(f"--gpus-per-node {needed} but partition "
                              f"{args.partition or '(default)'} has {available} GPUs per node: lower it or pick "
                              "another --partition")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    previous: str | None = None  # the first job's own dependency (--after) is in its script
    job_ids, scripts = [], [script for job in jobs for script in scripts_for(job.args.stage, job.args, job.overrides,
                                                                             job.name)]
    for index, (name, script) in enumerate(scripts):
        path = args.log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
        path.write_text(script)
        if not args.parsable:
            print(f"--- {path}\n{script}")
        if args.dry_run:
            if not args.parsable:  # the dependency on the job before, by name: its id exists once it is submitted
                print("would run: " + " ".join(sbatch_command(path, f"<id of {scripts[index - 1][0]}>" if index
                                                              else None)))
            continue
        previous = submit(path, previous)
        job_ids.append(previous)
        if not args.parsable:
            print(f"submitted {name}: job {previous} (log {args.log_dir.resolve()}/{name}-{previous}.out)")
    if args.parsable:
        print(",".join(job_ids))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
