"""A real Slurm cluster on this machine, started and stopped by the test suite: one node on loopback,
or several nodes made of Linux namespaces (tests/namespace_nodes.py), one slurmd in each.

Debian's slurmctld + slurmd (Slurm 22.05) run as root with no systemd, no cgroups and no munge:
``AuthType=auth/none``, ``CredType=cred/none``, ``ProctrackType=proctrack/linuxproc``. The node declares
4 CPUs whatever the machine has (``SlurmdParameters=config_overrides``). Config, state, spool, logs, pid
files and the job completion records live in one temp dir; every command finds the config through
``SLURM_CONF`` (use ``cluster.env`` / ``cluster.run``), so several clusters can run side by side.
slurmctld runs in this process's network namespace; a node's slurmd is started through its ``wrap``
(``nsenter`` into the node's namespaces), so its jobs run "on" that node.

    with SlurmCluster() as cluster:
        job = cluster.sbatch("--wrap", "echo hello")
        assert cluster.wait_for(job) == "COMPLETED"
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "sinfo", "srun", "scancel")
REQUIRED = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client")
# Where Debian puts the daemons; not on every user's PATH.
EXTRA_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
# Also final; wait_for() stops on these whatever it waits for, rather than running into its timeout.
DEAD_END_STATES = frozenset({"NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


def _search_path(path: str | None = None) -> str:
    parts = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    return os.pathsep.join([p for p in parts if p] + [p for p in EXTRA_PATH if p not in parts])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def _missing(required: Iterable[str] = REQUIRED) -> list[str]:
    return [name for name in required if _which(name) is None]


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def ensure_installed(what: str, required: Iterable[str], packages: Iterable[str], timeout: float = 900) -> str | None:
    """None when the `required` commands are here (installing `packages` with apt if needed and allowed);
    otherwise a human-readable reason why `what` is not available."""
    required, packages = tuple(required), tuple(packages)
    if not _missing(required):
        return None
    if os.geteuid() != 0:
        return f"{what} is not installed ({', '.join(_missing(required))} missing) and we are not root to apt-get it"
    apt = shutil.which("apt-get", path=_search_path())
    if apt is None:
        return f"{what} is not installed ({', '.join(_missing(required))} missing) and there is no apt-get"
    # One installer at a time among our own processes (pytest-xdist workers, parallel sessions).
    with open(os.path.join(tempfile.gettempdir(), "shorten-apt-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _missing(required):
            return None
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=_search_path())
        install = [apt, "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", *packages]
        # Without a policy-rc.d the packages' init scripts would try to start the daemons (Slurm's with a
        # /etc/slurm/slurm.conf that does not exist); the policy denies every service start during install.
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = False
        log = []
        try:
            if not policy.exists():
                policy.write_text("#!/bin/sh\n# written by tests/slurm_cluster.py for the install\nexit 101\n")
                policy.chmod(0o755)
                made_policy = True
            for command in (install, [apt, "-o", "DPkg::Lock::Timeout=300", "update", "-q"], install):
                try:
                    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                          text=True, timeout=timeout)
                except subprocess.TimeoutExpired as exc:
                    log.append(f"$ {' '.join(command)}\ntimed out after {timeout:.0f} s\n{exc.stdout or ''}")
                    break
                log.append(f"$ {' '.join(command)}  (exit {done.returncode})\n{done.stdout}{done.stderr}")
                if command is install and done.returncode == 0:
                    break
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)
    missing = _missing(required)
    if not missing:
        return None
    return (f"{what} could not be installed with apt-get ({', '.join(missing)} still missing); "
            f"apt said:\n{_tail(''.join(log), 25)}")


def ensure_slurm_installed(timeout: float = 900) -> str | None:
    """None when Slurm's daemons and client commands are here (installed with apt if needed and allowed)."""
    return ensure_installed("Slurm", REQUIRED, APT_PACKAGES, timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if the test process dies without stopping it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, session id) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return name, int(fields[1]), int(fields[3])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _proc_stat(pid)
        if stat is None:
            break
        pid = stat[1]
    return pids


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = {pid for pid in pids if _proc_stat(pid) is not None}
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


CONF_MARK = "# Test cluster written by tests/slurm_cluster.py"


def reap_orphans() -> list[int]:
    """Kill what clusters of ours left behind when their test process was killed outright (SIGKILL):
    the daemons go with it (PR_SET_PDEATHSIG) but slurmstepd and the job processes stay. Only processes
    whose SLURM_CONF is a config this module wrote, and whose cluster has no live daemon, are touched."""
    by_conf: dict[str, set[int]] = {}
    daemons: set[str] = set()
    for pid in _pids():
        conf = _proc_environ(pid).get("SLURM_CONF")
        stat = _proc_stat(pid)
        if not conf or stat is None:
            continue
        by_conf.setdefault(conf, set()).add(pid)
        if stat[0] in DAEMONS:
            daemons.add(conf)
    orphans: set[int] = set()
    for conf, pids in by_conf.items():
        if conf in daemons:
            continue
        try:
            with open(conf) as f:
                ours = f.readline().strip() == CONF_MARK
        except OSError:
            ours = False
        if ours:
            orphans |= pids
    orphans = (orphans | _descendants(orphans)) - _ancestors()
    _signal_all(orphans, signal.SIGKILL)
    _wait_gone(orphans, 5)
    return sorted(orphans)


class SlurmError(RuntimeError):
    pass


def _same_host(argv: list[str]) -> list[str]:
    return argv


@dataclass(frozen=True)
class SlurmNode:
    """A node of the cluster: its name, the address its slurmd listens on, and how to start a process
    there (``wrap(argv)``: the command that runs argv on the node)."""

    name: str
    address: str
    wrap: Callable[[list[str]], list[str]] = field(default=_same_host, compare=False)


class SlurmCluster:
    """One slurmctld + one slurmd per node (default: node ``localhost`` on 127.0.0.1), partition ``debug``
    holding every node, 4 CPUs per node, all under a temp dir.

    ``extra_config`` lines are appended to slurm.conf (a later line wins for most keys), e.g.
    ``["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE"]``. ``controller_address`` is where the
    nodes reach slurmctld (the host's side of the nodes' bridge).
    """

    partition = "debug"
    cpus = 4
    real_memory_mb = 1024

    def __init__(self, root: str | os.PathLike | None = None, extra_config: Iterable[str] = (),
                 start_timeout: float = 60.0, kill_wait: int = 30, cred_expire: int = 10,
                 nodes: Sequence[SlurmNode] = (), controller_address: str = "127.0.0.1"):
        # Short base path: slurmd puts unix sockets (108-byte limit) in its spool dir.
        base = root if root is not None else ("/tmp" if os.path.isdir("/tmp") else None)
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
        self.conf_path = self.dir / "slurm.conf"
        self.jobcomp_path = self.dir / "jobcomp.txt"
        self.state_dir = self.dir / "state"
        self.spool_dir = self.dir / "spool"
        self.extra_config = list(extra_config)
        self.nodes = list(nodes) or [SlurmNode("localhost", "127.0.0.1")]
        self.controller_address = controller_address
        self.start_timeout = start_timeout
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.ctld_port = self.slurmd_port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf_path), PATH=_search_path())
        for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SQUEUE_FORMAT", "SQUEUE_SORT", "SBATCH_PARTITION"):
            self.env.pop(key, None)
        self.failed = False

    # -- configuration ---------------------------------------------------------------------------------

    def config_text(self) -> str:
        d = self.dir
        lines = [
            CONF_MARK,
            f"ClusterName=shorten{os.getpid()}",
            f"SlurmctldHost=localhost({self.controller_address})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may start again once its job credential expires: cred_expire + ~1 s instead
            # of ~135 s. 5 is the least Slurm takes (smaller: "invalid", back to 120); it is also how long
            # a step launch may take, so the default stays at 10 for loaded 2-core machines.
            f"AuthInfo=cred_expire={self.cred_expire}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmctldParameters=preempt_send_user_signal",
            "ReturnToService=2",
            "JobRequeue=1",
            # Slurm's default: a job kill (scontrol requeue, preemption without grace) waits this long
            # between SIGTERM and SIGKILL; a loaded 2-core machine needs more than a few seconds to commit
            f"KillWait={self.kill_wait}",
            "MinJobAge=120",
            "MaxJobCount=10000",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=300",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_path}",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmdSpoolDir={self.spool_dir}/%n",  # %n: the node's name
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *(f"NodeName={node.name} NodeAddr={node.address} CPUs={self.cpus} RealMemory={self.real_memory_mb} "
              "State=UNKNOWN" for node in self.nodes),
            f"PartitionName={self.partition} Nodes={','.join(node.name for node in self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP",
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.state_dir.mkdir(exist_ok=True)
        for node in self.nodes:
            (self.spool_dir / node.name).mkdir(parents=True, exist_ok=True)
        self.ctld_port = _free_port()
        self.slurmd_port = _free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = _free_port()
        self.conf_path.write_text(self.config_text())
        (self.dir / "cgroup.conf").write_text("# not used: proctrack/linuxproc, task/none\n")

    # -- life cycle ------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep=exc_type is not None)

    def start(self) -> None:
        reason = ensure_slurm_installed()
        if reason is not None:
            raise SlurmError(reason)
        reap_orphans()
        try:
            for attempt in range(3):
                self._write_config()
                self._launch()
                try:
                    self._wait_until_idle()
                    return
                except SlurmError:
                    # A port taken between _free_port() and the daemon's bind: start again on new ports.
                    if attempt == 2 or "Address already in use" not in self.logs(200):
                        raise
                    self._stop_processes()
        except BaseException:
            self.failed = True
            self._stop_processes()
            raise

    def _launch(self) -> None:
        commands = {
            # -D: stay in the foreground, so the Popen is the daemon; -i: ignore state left in StateSaveLocation.
            "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(self.conf_path)],
            **{f"slurmd-{node.name}": node.wrap([_which("slurmd"), "-D", "-N", node.name, "-f", str(self.conf_path)])
               for node in self.nodes},
        }
        for name, command in commands.items():
            out = open(self.dir / f"{name}.out", "ab")  # the child keeps its own copy
            try:
                self.procs[name] = subprocess.Popen(
                    command, env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
            finally:
                out.close()

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while starting\n{self.logs()}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env,
                                  capture_output=True, text=True, timeout=30)
            states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
            # "idle*" would be a node not responding; ~#!%$@^- are power/drain/reboot suffixes.
            if done.returncode == 0 and all(states.get(node.name, "").rstrip("~#!%$@^-") in
                                            ("idle", "mixed", "allocated") for node in self.nodes):
                return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {self.start_timeout:.0f} s (last sinfo states {states})\n"
                         f"{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        parts = []
        for name in ("slurmctld", *(f"slurmd-{node.name}" for node in self.nodes)):
            for suffix in ("log", "out"):
                path = self.dir / f"{name}.{suffix}"
                if path.exists() and path.stat().st_size:
                    text = path.read_text(errors="replace")
                    parts.append(f"--- {path} (last {lines} lines)\n{_tail(text, lines)}")
        return "\n".join(parts) or f"(no daemon logs in {self.dir})"

    def stop(self, keep: bool = False) -> None:
        """Cancel the jobs, stop the daemons and every process of this cluster's jobs, then delete the
        temp dir unless ``keep``, SLURM_TEST_KEEP=1 or something of the cluster's own failed."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._cancel_all()
        self._stop_processes()
        if keep or self.failed or os.environ.get("SLURM_TEST_KEEP") == "1":
            warnings.warn(f"Slurm test cluster files kept for inspection in {self.dir}", stacklevel=2)
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def _cancel_all(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout=15)
        deadline = time.monotonic() + self.kill_wait + 10
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split():
                return
            time.sleep(0.5)

    def _our_stray_pids(self) -> set[int]:
        """slurmstepd and job processes of this cluster: descendants of our daemons, processes in their
        sessions, and any process whose environment carries our SLURM_CONF (slurmstepd inherits it from
        slurmd, jobs from sbatch/srun) -- never this process or its ancestors."""
        roots = {proc.pid for proc in self.procs.values()}
        sessions = {pid for pid in roots}  # start_new_session: each daemon leads its own session
        conf = str(self.conf_path)
        found = _descendants(roots)
        for pid in _pids():
            stat = _proc_stat(pid)
            if stat is None:
                continue
            if stat[2] in sessions or _proc_environ(pid).get("SLURM_CONF") == conf:
                found.add(pid)
        found |= _descendants(found)
        return found - _ancestors()

    def _stop_processes(self) -> None:
        procs = {name: proc for name, proc in self.procs.items() if proc.poll() is None}
        strays = self._our_stray_pids()
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        _signal_all(strays, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        left = _wait_gone(strays | self._our_stray_pids(), 2)
        _signal_all(left | self._our_stray_pids(), signal.SIGKILL)
        left = _wait_gone(left | self._our_stray_pids(), 5)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.procs = {}
        if left:
            self.failed = True
            raise SlurmError(f"could not stop processes {sorted(left)} of the Slurm cluster in {self.dir}")

    # -- commands --------------------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm command (``cluster.run("squeue", "-h")``) against this cluster; text output. An `env`
        of the caller's must carry this cluster's SLURM_CONF (start from ``cluster.env``)."""
        done = subprocess.run([str(a) for a in args], env=self.env if env is None else env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, args))} exited with {done.returncode}\n"
                             f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def sbatch(self, *args: str, **kwargs) -> int:
        """Submit with ``sbatch --parsable ARGS`` and return the job id."""
        out = self.run("sbatch", "--parsable", *args, **kwargs).stdout.strip()
        return int(out.split(";")[0])

    def show_job(self, job_id: int | str) -> dict[str, str] | None:
        """``scontrol show job -o`` as a dict, or None when slurmctld no longer knows the job."""
        done = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        line = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
        if done.returncode != 0 or "JobId=" not in line:
            return None
        return _fields(line)

    def jobcomp_records(self, job_id: int | str) -> list[dict[str, str]]:
        """The job's lines in the jobcomp/filetxt file (one per run that ended, requeues included)."""
        if not self.jobcomp_path.exists():
            return []
        records = []
        for line in self.jobcomp_path.read_text(errors="replace").splitlines():
            if re.match(rf"JobId={job_id}\s", line):
                records.append(_fields(line))
        return records

    def job_state(self, job_id: int | str) -> str:
        """JobState of the job: PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, ...;
        "UNKNOWN" when neither slurmctld nor the jobcomp file knows it."""
        job = self.show_job(job_id)
        if job is not None:
            return job.get("JobState", "UNKNOWN")
        records = self.jobcomp_records(job_id)
        return records[-1].get("JobState", "UNKNOWN") if records else "UNKNOWN"

    def restart_count(self, job_id: int | str) -> int:
        """How many times the job was requeued (Restarts=, or the jobcomp file once the job is purged)."""
        job = self.show_job(job_id)
        if job is not None:
            return int(job.get("Restarts", "0"))
        # A requeued run leaves a record whose JobState is not final (PENDING, seen with 22.05).
        return sum(1 for record in self.jobcomp_records(job_id)
                   if (record.get("JobState") or "?").split()[0] not in FINAL_STATES | DEAD_END_STATES)

    def wait_for(self, job_id: int | str, states: Iterable[str] = FINAL_STATES, timeout: float = 120,
                 poll: float = 0.5) -> str:
        """Poll until the job is in one of ``states`` (or a dead-end state) and return that state."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while True:
            state = self.job_state(job_id)
            if state in wanted or state in DEAD_END_STATES:
                return state
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.failed = True
                    raise SlurmError(f"{name} died (exit {proc.returncode}) while job {job_id} was {state}\n"
                                     f"{self.logs()}")
            if time.monotonic() > deadline:
                job = self.show_job(job_id)
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (wanted "
                                   f"{sorted(wanted)}); Reason={job.get('Reason') if job else None}\n"
                                   f"{self.logs()}")
            time.sleep(poll)


def _fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value with spaces Key3=...`` -> dict (a value runs to the next `` Key=``)."""
    fields = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", line))
    for match, following in zip(matches, matches[1:] + [None], strict=True):
        end = following.start() if following is not None else len(line)
        fields.setdefault(match.group(1), line[match.end():end].strip())
    return fields
