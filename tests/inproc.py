"""Real nodes in the test's own process (loopback sockets, files under a temporary
directory), for tests that must hold a node at an exact await point."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.node.daemon import Node
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


@contextlib.asynccontextmanager
async def two_nodes(tmp: str, names: tuple[str, str], cluster: str, size: int
                    ) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes started in this process, volume `v` of `size` bytes on the first, and
    their peer link up; both stopped on the way out."""
    cfg = loopback_cluster(tmp, names, cluster)
    a, b = Node(cfg, names[0]), Node(cfg, names[1])
    await a.start()
    await b.start()
    try:
        a.volumes.create("v", size)
        await until(lambda: a.replication.peers.is_up(names[1]), "the peer link")
        yield a, b
    finally:
        await b.stop()
        await a.stop()
