"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc


@pytest.fixture
def two(tmp_path: object) -> Iterator[ClusterProc]:
    """Nodes A and B running, their peer link up; stopped on the way out."""
    c = ClusterProc(str(tmp_path))
    c.start()
    try:
        c.wait_peer("A", "B")
        yield c
    finally:
        c.stop()
