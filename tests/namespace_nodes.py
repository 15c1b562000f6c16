"""Several "nodes" on this machine, made of Linux namespaces, for multi-node tests without a cluster.

Each node is a network namespace with one interface on a private bridge (its own address; the host
keeps the bridge's ``.254``), a UTS namespace with its own hostname, and a mount namespace in which
the node sees its own ``/run``, an ``/etc/hosts`` naming every node, and its own node-local scratch
directory at the same path as every other node's (``nodes.scratch``, as ``/scratch`` on a cluster).
``nodes.shared`` is seen by all, as the cluster's shared filesystem is. A process runs on a node
through ``node.wrap(argv)`` (``nsenter`` into the node's namespaces); its children stay there, so a
slurmd or sshd started on a node runs its jobs and sessions on that node.

    with NamespaceNodes(("node1", "node2")) as nodes:
        nodes["node2"].run(["hostname"])              # -> node2
        nodes.start_sshd()                            # key-based ssh between the nodes: nodes.ssh_env()

It needs root (namespaces, bridge) and cleans up exactly what it made: its namespaces, links, the
processes inside its namespaces and its temp dir (kept after a failure, for the logs). Names carry this
process's pid, so `reap_leftovers()` can remove what a killed test run left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.slurm_cluster import _die_with_parent, _search_path, _wait_gone, _which, ensure_installed

REQUIRED = ("ip", "nsenter", "unshare", "mount", "hostname")
SSH_REQUIRED = ("sshd", "ssh", "ssh-keygen", "pdsh")
SSH_PACKAGES = ("openssh-server", "openssh-client", "pdsh")
# Every name carries <pid>x<k>: this process and its k-th set of nodes.
NETNS_PREFIX = "shorten-"  # shorten-<pid>x<k>-<node>
LINK_PREFIX = "shv"  # shv<pid>x<k>n<i>: the host's end of node i's veth pair
BRIDGE_PREFIX = "shb"  # shb<pid>x<k>: the bridge

# Run by each node's anchor process inside its fresh UTS and mount namespaces, then it sleeps and holds them.
ANCHOR_SCRIPT = """set -e
hostname "$1"
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind "$2" /etc/hosts
mount --bind "$3" "$4"
echo ready
exec sleep infinity
"""


class NodeError(RuntimeError):
    pass


def ensure_node_tools(with_ssh: bool = False) -> str | None:
    """None when namespaces can be made here (and ssh + pdsh are installed, with apt if needed), else why not."""
    if os.geteuid() != 0:
        return "multi-node tests need root: network namespaces and a bridge"
    missing = [name for name in REQUIRED if _which(name) is None]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux) for namespace nodes"
    # Root in a container may still lack the capabilities: try in a throwaway namespace that goes with it.
    probe = _run([_which("unshare"), "--net", "--uts", "--mount", "--", _which("ip"), "link", "add", "probe0",
                  "type", "bridge"], check=False)
    if probe.returncode != 0:
        return f"cannot make network namespaces and bridges here: {probe.stderr.strip()}"
    return ensure_installed("OpenSSH server and pdsh", SSH_REQUIRED, SSH_PACKAGES) if with_ssh else None


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PATH=_search_path()))
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


def _netns_inode_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _netns_inode_of(int(p)) == inode}


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no interface here uses."""
    used = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    for third in range(os.getpid() % 200, os.getpid() % 200 + 250):
        net = ipaddress.IPv4Network(f"10.213.{third % 250}.0/24")
        if f" 10.213.{third % 250}." not in used:
            return net
    raise NodeError("no free /24 in 10.213.0.0/16 for the namespace nodes")


class Node:
    """One namespace node: its name, address, and how to run a process on it."""

    def __init__(self, name: str, address: str, netns: str, scratch: Path):
        self.name, self.address, self.netns, self.scratch = name, address, netns, scratch
        self.anchor: subprocess.Popen | None = None

    def wrap(self, argv: Sequence[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """The command that runs argv on this node, in `cwd` (default: the current directory)."""
        if self.anchor is None:
            raise NodeError(f"node {self.name} is not started")
        return [_which("nsenter"), f"--target={self.anchor.pid}", "--net", "--uts", "--mount",
                f"--wd={cwd or os.getcwd()}", "--", *map(str, argv)]

    def popen(self, argv: Sequence[str], cwd=None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv, cwd), **kwargs)

    def run(self, argv: Sequence[str], cwd=None, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(self.wrap(argv, cwd), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise NodeError(f"on {self.name}: {' '.join(map(str, argv))} exited with {done.returncode}\n"
                            f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def pids(self) -> set[int]:
        """Every process running on this node now (its network namespace), the anchor included."""
        inode = _netns_inode_of(self.anchor.pid) if self.anchor is not None else None
        return _pids_in_netns(inode) if inode is not None else set()

    def set_link(self, up: bool) -> None:
        """Take the node's network interface down (it drops off the network) or bring it back."""
        self.run(["ip", "link", "set", "eth0", "up" if up else "down"])


def _drop_bulk(root: Path, limit: int = 1 << 20) -> int:
    """Delete the files over `limit` bytes under `root` (checkpoints, weights: gigabytes per two-node run, which
    would fill a CI disk after a few failures) and return the MiB freed; logs and configs stay."""
    freed = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and (size := path.stat().st_size) > limit:
            freed += size
            path.unlink()
    return freed >> 20


class NamespaceNodes:
    """Nodes `names` on a private bridge, with per-node scratch and one shared directory."""

    _instances = itertools.count()

    def __init__(self, names: Iterable[str] = ("node1", "node2"), root: str | os.PathLike | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="nodes-", dir=root or "/tmp"))
        self.shared = self.dir / "shared"
        self.scratch = self.dir / "scratch"  # each node mounts its own directory here
        self.tag = f"{os.getpid()}x{next(self._instances)}"
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: dict[str, Node] = {}
        self._names = list(names)
        self._daemons: list[subprocess.Popen] = []
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name) in the order made
        self.failed = False

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __iter__(self):
        return iter(self.nodes.values())

    @property
    def host_address(self) -> str:
        """The host's address on the bridge: where the nodes reach services of this process's namespace."""
        return str(self.subnet.network_address + 254)

    def __enter__(self) -> NamespaceNodes:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep=exc_type is not None)

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        reason = ensure_node_tools()
        if reason is not None:
            raise NodeError(reason)
        reap_leftovers()
        try:
            self._start()
        except BaseException:
            self.failed = True
            self.stop()
            raise

    def _start(self) -> None:
        self.subnet = _free_subnet()
        self.shared.mkdir()
        self.scratch.mkdir()
        self._made.append(("link", self.bridge))
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for index, name in enumerate(self._names, start=1):
            node = Node(name, str(self.subnet.network_address + index), f"{NETNS_PREFIX}{self.tag}-{name}",
                        self.dir / f"{name}-scratch")
            node.scratch.mkdir()
            self.nodes[name] = node
            link = f"{LINK_PREFIX}{self.tag}n{index}"
            self._made.append(("netns", node.netns))
            _run(["ip", "netns", "add", node.netns])
            self._made.append(("link", link))
            _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", node.netns])
            _run(["ip", "link", "set", link, "master", self.bridge])
            _run(["ip", "link", "set", link, "up"])
            for command in (["ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
                            ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
                _run(["ip", "netns", "exec", node.netns, *command])
        hosts = self.dir / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in self) +
                         f"{self.host_address} {self.bridge}-host\n")
        for node in self:
            node.anchor = subprocess.Popen(
                # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd needs.
                [_which("nsenter"), f"--net=/run/netns/{node.netns}", "--", _which("unshare"), "--uts", "--mount",
                 "--propagation", "private", "--", "sh", "-c", ANCHOR_SCRIPT, "anchor", node.name, str(hosts),
                 str(node.scratch), str(self.scratch)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True, preexec_fn=_die_with_parent, env=dict(os.environ, PATH=_search_path()))
            if node.anchor.stdout.readline().strip() != "ready":
                node.anchor.wait(timeout=10)
                raise NodeError(f"node {node.name} did not start: {node.anchor.stderr.read().strip()}")
        for node in self:
            for other in self:
                if node.run(["getent", "hosts", other.name]).stdout.split()[0] != other.address:
                    raise NodeError(f"{other.name} does not resolve to {other.address} on {node.name}")

    def stop(self, keep: bool = False) -> None:
        """Stop every process on the nodes, delete the namespaces and links, then the temp dir unless `keep`,
        SLURM_TEST_KEEP=1 or something of the nodes' own failed."""
        for daemon in self._daemons:
            with contextlib.suppress(ProcessLookupError):
                daemon.terminate()
        inside = set().union(*(node.pids() for node in self))
        for pid in inside:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        left = _wait_gone(inside, 10)
        for daemon in [*self._daemons, *(node.anchor for node in self if node.anchor is not None)]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=5)
        for kind, name in reversed(self._made):
            # A namespace goes away with its last process; its veth end with it, and the host's end with that.
            if kind == "netns":
                _run(["ip", "netns", "delete", name], check=False)
            else:
                _run(["ip", "link", "delete", name], check=False)
        self._made = []
        if left:
            self.failed = True
            warnings.warn(f"processes {sorted(left)} on the namespace nodes survived SIGKILL", stacklevel=2)
        if os.environ.get("SLURM_TEST_KEEP") == "1":
            warnings.warn(f"namespace node files kept for inspection in {self.dir}", stacklevel=2)
        elif keep or self.failed:
            dropped = _drop_bulk(self.dir)
            warnings.warn(f"namespace node logs and configs kept for inspection in {self.dir} ({dropped} MiB of "
                          "checkpoints and weights deleted; SLURM_TEST_KEEP=1 keeps everything)", stacklevel=2)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- ssh -------------------------------------------------------------------------------------------

    def start_sshd(self) -> None:
        """An sshd on each node (port 22 of its address) that takes one key made here, for root; a client
        config and an `ssh` wrapper using it (`ssh_env()`), so pdsh and the deepspeed launcher reach the
        nodes by name without touching ~/.ssh."""
        reason = ensure_node_tools(with_ssh=True)
        if reason is not None:
            raise NodeError(reason)
        ssh = self.dir / "ssh"
        ssh.mkdir(mode=0o700)
        for key in ("host_key", "id_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"shorten-test-{key}", "-f", str(ssh / key)])
        shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
        (ssh / "ssh_config").write_text(
            f"Host *\n  IdentityFile {ssh / 'id_ed25519'}\n  IdentitiesOnly yes\n  User root\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  ConnectTimeout 10\n  LogLevel ERROR\n")
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {_which('ssh')} -F {ssh / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        for node in self:
            config = ssh / f"sshd_config.{node.name}"
            config.write_text(
                f"ListenAddress {node.address}\nPort 22\nHostKey {ssh / 'host_key'}\n"
                f"PidFile {ssh / f'sshd.{node.name}.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPrintMotd no\nAcceptEnv none\n")
            node.run(["mkdir", "-p", "-m", "755", "/run/sshd"])  # privilege separation dir, in the node's /run
            log = open(ssh / f"sshd.{node.name}.log", "ab")
            try:
                self._daemons.append(node.popen([_which("sshd"), "-D", "-e", "-f", str(config)],
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=_die_with_parent))
            finally:
                log.close()
        deadline = time.monotonic() + 30
        for node in self:
            for other in self:
                while True:
                    done = node.run(["ssh", other.name, "hostname"], check=False, env=self.ssh_env())
                    if done.returncode == 0 and done.stdout.strip() == other.name:
                        break
                    if time.monotonic() > deadline:
                        raise NodeError(f"ssh from {node.name} to {other.name} failed: {done.stderr.strip()}\n"
                                        f"{(ssh / f'sshd.{other.name}.log').read_text(errors='replace')[-2000:]}")
                    time.sleep(0.2)

    def ssh_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """`env` (default: ours) with the `ssh` wrapper first on PATH."""
        env = dict(os.environ if env is None else env)
        env["PATH"] = f"{self.dir / 'bin'}{os.pathsep}{_search_path(env.get('PATH'))}"
        return env


def reap_leftovers() -> list[str]:
    """Delete namespaces and links of ours whose process is gone (a test run killed outright)."""
    removed = []
    for name in _run(["ip", "netns", "list"], check=False).stdout.split():
        match = re.fullmatch(rf"{NETNS_PREFIX}(\d+)x\d+-\S+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            inode = os.stat(f"/run/netns/{name}").st_ino
            for pid in _pids_in_netns(inode):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        match = re.match(rf"\d+: (({LINK_PREFIX}|{BRIDGE_PREFIX})(\d+)x\d+\S*?)[@:]", line)
        if match and not Path(f"/proc/{match.group(3)}").exists():
            _run(["ip", "link", "delete", match.group(1)], check=False)
            removed.append(match.group(1))
    return removed
