"""A storage node: one asyncio process owning one data directory.

Wires the volume manager (catalog + backing stores), the NBD server, replication and
the HTTP API (built by `make_app`, passed in so this module does not import the API
that is written against it), and stops them in order.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from twinvol import clock
from twinvol.cluster import ClusterConfig, ClusterError
from twinvol.faults.node import FaultManager
from twinvol.faults.store import FaultStoreError
from twinvol.nbd.aio import Backend, NbdServerProtocol
from twinvol.nbd.aio_group import close_all, rebind, shutdown_all
from twinvol.nbd.iostats import IoStats
from twinvol.nbd.server_events import ExportInfo
from twinvol.node.events import EventBus
from twinvol.node.switching import Switching
from twinvol.replication.manager import ReplicationManager
from twinvol.storage.catalog import VolumeRecord
from twinvol.storage.volumes import Volume, VolumeError, VolumeManager
from twinvol.tls.context import api_contexts, nbd_guard
from twinvol.tls.https import api_site


class NodeStartError(Exception):
    """The node cannot start (data directory locked, port taken, catalog damaged...)."""


class Node:
    """A running storage node."""

    def __init__(self, cluster: ClusterConfig, name: str,
                 make_app: Callable[[Node], web.Application] | None = None) -> None:
        """`make_app` builds the HTTP API (node/api.py); None runs without one (a node
        embedded in an in-process test)."""
        self.make_app = make_app
        self.cluster = cluster
        self.name = name
        self.config = cluster.node(name)
        self.data_dir = cluster.data_dir(name)
        self.log = logging.getLogger("twinvol.node")
        self.started = clock.monotonic()
        # Insertion-ordered (a dict, not a set): closing them is done in one order
        # every run, which the deterministic simulator needs to replay a seed.
        self.connections: dict[NbdServerProtocol, None] = {}
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="flush")
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock_fd = self._lock_data_dir()
        self._check_identity()
        self.volumes = VolumeManager(self.data_dir)
        self.events = EventBus(name, self.config.site)
        try:
            self.faults = FaultManager(cluster, name, self.data_dir, self.events.listen)
        except FaultStoreError as e:
            raise NodeStartError(str(e)) from None
        self.io_stats = IoStats()  # NBD request counter and the disk fault hooks
        self.io_stats.on_error = self.faults.on_io_error
        self.io_stats.on_slow = self.faults.on_slow_io
        self.replication = ReplicationManager(self)
        self.switching = Switching(self)
        self._nbd_server: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = False

    def _lock_data_dir(self) -> int:
        fd = os.open(os.path.join(self.data_dir, "node.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeStartError(f"data directory {self.data_dir} is in use by another node "
                                 "process") from None
        return fd

    def _check_identity(self) -> None:
        marker = os.path.join(self.data_dir, "node-name")
        try:
            with open(marker) as f:
                owner = f.read().strip()
        except FileNotFoundError:
            with open(marker, "w") as f:
                f.write(self.name + "\n")
            return
        if owner != self.name:
            raise NodeStartError(f"data directory {self.data_dir} belongs to node {owner!r}, "
                                 f"not {self.name!r}")

    # ---- ExportRegistry -------------------------------------------------

    def lookup(self, name: str) -> ExportInfo | None:
        return self.volumes.lookup(name)

    def set_io_mode(self, vol_name: str, mode: str, reason: str = "", *,
                    expected: bool = False) -> None:
        """Change a volume's I/O mode; `block` refuses new clients and drops current ones.
        `expected`: the block is the normal state of a copy target, not a fault."""
        vol = self.volumes.get(vol_name)
        if vol.io_mode == mode:
            return
        old, vol.io_mode = vol.io_mode, mode
        if mode == "block":
            vol.export.blocked = (f"volume {vol_name!r} on node {self.name} is blocked "
                                  f"(stale copy){': ' + reason if reason else ''}; use the "
                                  "partner node")
            self._drop(vol.export)
        else:
            vol.export.blocked = None
        self.events.publish("io_mode", volume=vol_name, export=vol.record.export_name,
                            mode=mode, previous=old, reason=reason,
                            **({"expected": True} if expected else {}))

    def fence(self, vol_name: str, reason: str) -> None:
        """This copy lost its right to serve (its lease ran out): refuse new clients and
        drop current ones, leaving the I/O mode as the pair decided it."""
        vol = self.volumes.get(vol_name)
        if vol.export.blocked is not None:
            return
        vol.export.blocked = (f"volume {vol_name!r} on node {self.name} is fenced: {reason}; "
                              "use the partner node")
        self._drop(vol.export)
        self.events.publish("fenced", volume=vol_name, reason=reason)

    def unfence(self, vol_name: str) -> None:
        vol = self.volumes.get(vol_name)
        if vol.io_mode != "block" and vol.export.blocked is not None:
            vol.export.blocked = None
            self.events.publish("unfenced", volume=vol_name)

    def drop_clients(self, vol_name: str) -> None:
        """Close the host connections of a volume (they reconnect to its new write path)."""
        self._drop(self.volumes.get(vol_name).export)

    def _drop(self, export: ExportInfo) -> None:
        close_all([c for c in self.connections if c.export is export])

    def list_exports(self) -> list[ExportInfo]:
        return list(self.volumes.list_exports())

    def attach(self, export: ExportInfo) -> Backend:
        vol = self.volumes.by_export(export.name)
        assert vol is not None
        vol.connections += 1
        return self.switching.backend(export.name) or self.volume_backend(vol)

    def volume_backend(self, vol: Volume) -> Backend:
        """What host I/O to `vol` goes through: its pair's write path, or its store."""
        replicated = self.replication.backend_for(vol)
        return vol.store if replicated is None else replicated

    def export_connections(self, name: str) -> list[NbdServerProtocol]:
        return [c for c in self.connections if c.export is not None and c.export.name == name]

    async def rebind_export(self, name: str, timeout: float = 10.0) -> None:
        """Give the open connections of export `name` the backend new ones would get
        (after a switch or a new local pair), without the clients noticing."""
        conns = self.export_connections(name)
        if conns:
            await rebind(conns, self.attach_backend(name), timeout)

    def attach_backend(self, name: str) -> Backend | None:
        vol = self.volumes.by_export(name)
        if vol is None:
            return None
        return self.switching.backend(name) or self.volume_backend(vol)

    def detach(self, export: ExportInfo) -> None:
        vol = self.volumes.by_export(export.name)
        if vol is not None and vol.export is export:
            vol.connections = max(0, vol.connections - 1)

    # ---- operations that touch connections ------------------------------

    def check_unpaired(self, name: str, action: str) -> None:
        pr = self.replication.by_volume.get(name)
        lp = self.replication.local.by_volume.get(name)
        paired = pr.rec.name if pr is not None else lp.rec.name if lp is not None else None
        if paired is not None:
            raise VolumeError(f"volume {name!r} is in pair {paired!r}; delete the pair "
                              f"before you {action} it", "conflict")
        self.switching.check_free(name, action + " it")

    def delete_volume(self, name: str, *, force: bool) -> VolumeRecord:
        self.check_unpaired(name, "delete")
        vol = self.volumes.get(name)
        export = vol.export
        if force:
            self._drop(export)
        rec = self.volumes.delete(name, force=force)
        self.log.info("volume deleted", extra={"volume": name})
        self.events.publish("volume_deleted", volume=name, export=rec.export_name)
        return rec

    # ---- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Recover and start replication, then serve: nothing answers hosts or the API
        (`pair show` of a far copy, say) from a state the recovery is about to change."""
        await self.replication.start()
        loop = asyncio.get_running_loop()
        host, port = self.config.nbd_hostport
        try:
            guard = nbd_guard(self.cluster, self.name)
        except ClusterError as e:
            raise NodeStartError(str(e)) from None
        try:
            self._nbd_server = await loop.create_server(
                lambda: NbdServerProtocol(self, self.executor, self.connections, self.io_stats,
                                          guard),
                host, port, reuse_address=True, backlog=256)
        except OSError as e:
            raise NodeStartError(f"cannot listen for NBD on {host}:{port}: {e.strerror}") from e
        for sock in self._nbd_server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.make_app is not None:
            self._runner = web.AppRunner(self.make_app(self), access_log=None,
                                         handle_signals=False)
            await self._runner.setup()
            ahost, aport = self.config.api_hostport
            try:
                ctx = api_contexts(self.cluster, self.name)[0]
                await api_site(self._runner, ahost, aport, ctx, f"node {self.name}").start()
            except OSError as e:
                raise NodeStartError(f"cannot listen for the API on {ahost}:{aport}: "
                                     f"{e.strerror}") from e
        await self.faults.start()
        self.log.info("node serving", extra={"node": self.name, "nbd": self.config.nbd,
                                             "nbd_tls": guard.tls.value,
                                             "api": self.config.api, "pid": os.getpid(),
                                             "volumes": len(self.volumes.volumes)})

    async def stop(self) -> None:
        """Stop serving and close everything; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._nbd_server is not None:
            self._nbd_server.close()
        await shutdown_all(self.connections)
        await self.replication.stop()
        await self.switching.stop()
        await self.faults.stop()
        self.events.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.sleep(0)
        self.executor.shutdown(wait=True)
        self.volumes.close()
        os.close(self._lock_fd)
        self.log.info("node stopped", extra={"node": self.name})
