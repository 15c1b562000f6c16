"""The suite's own rules: every test the claims map (tests/README.md) names exists, and cluster tests that
cannot run are skipped on a developer's machine but fail where CI requires them."""

from __future__ import annotations

import ast
import re
import shutil

import pytest

from tests.fixtures import REQUIRE_CLUSTER_ENV, ROOT, cluster_tests_required, cluster_unavailable

CLAIMS_MAP = ROOT / "tests" / "README.md"


def test_every_test_the_claims_map_names_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", CLAIMS_MAP.read_text())
    assert len(named) >= 40, "the map names the tests of every guarantee"
    defined: dict[str, set[str]] = {}
    for path, test in named:
        if path not in defined:
            tree = ast.parse((ROOT / path).read_text())
            defined[path] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert test in defined[path], f"tests/README.md names {path}::{test}, which does not exist"


def test_cluster_tests_skip_here_and_fail_where_ci_requires_them():
    for env in ({}, {REQUIRE_CLUSTER_ENV: "0"}, {REQUIRE_CLUSTER_ENV: ""}):
        assert not cluster_tests_required(env)
        with pytest.raises(pytest.skip.Exception, match="no slurmd here"):
            cluster_unavailable("no slurmd here", env)
    assert cluster_tests_required({REQUIRE_CLUSTER_ENV: "1"})
    with pytest.raises(pytest.fail.Exception, match=r"no slurmd here \(SHORTEN_REQUIRE_CLUSTER=1: the cluster tests"):
        cluster_unavailable("no slurmd here", {REQUIRE_CLUSTER_ENV: "1"})
    assert "SHORTEN_REQUIRE_CLUSTER=1" in (ROOT / ".ci" / "run").read_text()


def test_a_slow_test_fails_at_once_naming_the_fix_when_the_temp_disk_is_nearly_full(request, monkeypatch):
    from tests import conftest

    class Item:  # what pytest_runtest_setup reads of a test item
        def __init__(self, slow: bool):
            self.config, self.slow = request.config, slow

        def get_closest_marker(self, name):
            return object() if name == "slow" and self.slow else None

    def free(gb: float):
        usage = shutil.disk_usage("/")._replace(free=int(gb * 2**30))
        monkeypatch.setattr(conftest.shutil, "disk_usage", lambda path: usage)

    free(conftest.MIN_FREE_GB_FOR_SLOW_TEST - 0.1)
    with pytest.raises(pytest.fail.Exception, match=r"only 4\.9 GB free under .*point TMPDIR \(or --basetemp\)"):
        conftest.pytest_runtest_setup(Item(slow=True))
    conftest.pytest_runtest_setup(Item(slow=False))  # a fast test writes little: no check
    free(conftest.MIN_FREE_GB_FOR_SLOW_TEST + 0.1)
    conftest.pytest_runtest_setup(Item(slow=True))
