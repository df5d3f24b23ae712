"""Shared fixtures: real twinvol node processes on loopback, and the real clients."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from nodeproc import NodeProc

CLIENTS = ("nbdinfo", "nbdcopy", "nbdsh", "qemu-io", "qemu-img", "fio")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """e2e tests need the real clients. In CI a missing client stops the run with an
    error (a test that cannot run must not pass as "expected"); elsewhere they skip."""
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if not missing or not any("e2e" in item.keywords for item in items):
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI: the real clients {missing} are missing; "
                                "scripts/setup installs them")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"missing clients: {missing}"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One node shared by a test module (tests use their own volumes)."""
    n = NodeProc(str(tmp_path_factory.mktemp("node")))
    n.start()
    yield n
    n.stop()


@pytest.fixture
def fresh_node(tmp_path: object) -> Iterator[NodeProc]:
    """A node of the test's own, for tests that kill or restart it."""
    n = NodeProc(str(tmp_path))
    n.start()
    yield n
    n.stop()
