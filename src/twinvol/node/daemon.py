"""The storage node daemon: runs a `Node` with its HTTP API in the foreground and shuts
it down in order on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from twinvol.cluster import ClusterConfig
from twinvol.node.api import make_app
from twinvol.node.node import Node, NodeStartError
from twinvol.storage.volumes import VolumeError


async def serve(cluster: ClusterConfig, name: str) -> None:
    node = Node(cluster, name, make_app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
    finally:
        await node.stop()


def run(cluster: ClusterConfig, name: str) -> None:
    """Run a node in the foreground until SIGTERM/SIGINT."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(serve(cluster, name))
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(cluster, name))


__all__ = ["Node", "NodeStartError", "VolumeError", "run", "serve"]
