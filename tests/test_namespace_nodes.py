"""The namespace nodes themselves (tests/namespace_nodes.py): separate hostnames, addresses, /run and
scratch, one shared directory, ssh between them, a node taken off the network, and a clean exit."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.fixtures import cluster_unavailable
from tests.namespace_nodes import NamespaceNodes, ensure_node_tools, reap_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # root, iproute2 and (for ssh) apt


@pytest.fixture(scope="module")
def nodes():
    reason = ensure_node_tools(with_ssh=True)
    if reason is not None:
        cluster_unavailable(reason)
    with NamespaceNodes(("alpha", "beta")) as nodes:
        nodes.start_sshd()
        yield nodes


def links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_each_node_has_its_own_name_address_run_and_scratch(nodes):
    alpha, beta = nodes["alpha"], nodes["beta"]
    for node in (alpha, beta):
        assert node.run(["hostname"]).stdout.strip() == node.name
        assert node.address in node.run(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
        assert node.run(["getent", "hosts", "beta"]).stdout.split()[0] == beta.address
    (alpha.scratch / "only-on-alpha").write_text("1")
    assert alpha.run(["ls", str(nodes.scratch)]).stdout.split() == ["only-on-alpha"]
    assert beta.run(["ls", str(nodes.scratch)]).stdout.split() == []
    alpha.run(["touch", "/run/only-on-alpha"])
    assert beta.run(["test", "-e", "/run/only-on-alpha"], check=False).returncode == 1
    assert not os.path.exists("/run/only-on-alpha")
    beta.run(["sh", "-c", f"echo from-beta > {nodes.shared / 'note'}"])
    assert (nodes.shared / "note").read_text() == "from-beta\n"


def test_ssh_by_name_and_a_node_off_the_network(nodes):
    alpha, beta = nodes["alpha"], nodes["beta"]
    assert alpha.run(["ssh", "beta", "hostname"], env=nodes.ssh_env()).stdout.strip() == "beta"
    beta.set_link(up=False)
    try:
        done = alpha.run(["ssh", "-o", "ConnectTimeout=3", "beta", "hostname"], env=nodes.ssh_env(), check=False)
        assert done.returncode == 255
    finally:
        beta.set_link(up=True)
    assert alpha.run(["ssh", "beta", "hostname"], env=nodes.ssh_env()).stdout.strip() == "beta"


def skip_without_node_tools() -> None:
    reason = ensure_node_tools()
    if reason is not None:
        cluster_unavailable(reason)


def test_stop_removes_exactly_what_was_made():
    skip_without_node_tools()
    before = links()
    nodes = NamespaceNodes(("gamma",))
    nodes.start()
    anchor = nodes["gamma"].anchor.pid
    assert nodes.bridge in links() and nodes["gamma"].netns in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout
    nodes.stop()
    assert links() == before and not nodes.dir.exists()
    assert nodes["gamma"].netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not os.path.exists(f"/proc/{anchor}")


def test_leftovers_of_a_killed_run_are_reaped():
    skip_without_node_tools()
    dead = _a_dead_pid()
    subprocess.run(["ip", "netns", "add", f"shorten-{dead}x0-node1"], check=True)
    subprocess.run(["ip", "link", "add", f"shb{dead}x0", "type", "bridge"], check=True)
    removed = reap_leftovers()
    assert f"shorten-{dead}x0-node1" in removed and f"shb{dead}x0" in removed
    assert f"shb{dead}x0" not in links()


def _a_dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
