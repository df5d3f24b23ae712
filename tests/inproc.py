"""Real nodes in the test's own process (loopback sockets, files under a temporary
directory), for tests that must hold a node at an exact await point."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.supervisor import free_ports


def loopback_cluster(tmp: str, names: tuple[str, ...], name: str) -> ClusterConfig:
    """A cluster file for `names` on free loopback ports, written under `tmp`."""
    ports = iter(free_ports(3 * len(names)))
    cfg = ClusterConfig(
        nodes={n: NodeConfig(site=n, nbd=f"127.0.0.1:{next(ports)}",
                             api=f"127.0.0.1:{next(ports)}", data_dir=f"data-{n}",
                             peer=f"127.0.0.1:{next(ports)}") for n in names},
        cluster=ClusterSection(name=name, secret=f"{name}-secret"))
    path = os.path.join(tmp, "cluster.toml")
    cluster_mod.dump(cfg, path)
    return cluster_mod.load(path)


async def until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
