"""The host agent: NBD server for clients, NBD client to the nodes, status API.

It owns what spans client connections: the exports (resolved on the nodes, their
sessions and counters), the node links and event watchers, the listeners and their
start and stop. One client's connection is `host/connection.py`; the HTTP API
`host/api.py`; the switching table `host/switching.py`; the process `host/process.py`.

Resolution: every path node is asked for the export (GET /api/v1/exports/NAME);
the nodes that have it must report the same virtual identity, or the export is
refused (NBD_REP_ERR_POLICY naming both nodes and what differs) and nothing is
forwarded. For NBD_OPT_GO/INFO the session's paths are connected right away, so
the first request finds them ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

from twinvol import __version__
from twinvol.access import TokenError
from twinvol.cluster import ClusterError, split_hostport
from twinvol.faults.host import HostFaults
from twinvol.host import UNIX_PATH_MAX, HostSetup, latency
from twinvol.host.api import make_app
from twinvol.host.connection import AgentProtocol
from twinvol.host.events import NodeWatcher
from twinvol.host.nodes import HttpNodeLink, NodeLink, NodeUnreachable
from twinvol.host.paths import Clock, PathState, identity_diff
from twinvol.host.relay import RelaySession, usable_for
from twinvol.host.session import Session
from twinvol.host.switching import Switching
from twinvol.host.tls import api_access, api_session, apply_tls, limited, plain_only
from twinvol.nbd.guard import Guard
from twinvol.nbd.server_events import ExportInfo
from twinvol.tls.https import api_site

log = logging.getLogger("twinvol.host")

TICK = 0.5
STOP_WAIT = 1.0  # the longest any one step of stopping waits (tasks, API, HTTP clients)
_COUNTERS = ("failovers", "retries", "held_total", "hold_failed", "sessions_total", "refused")


class ExportState:
    """What the agent knows about one export across sessions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.identity: dict[str, Any] | None = None
        self.sessions: set[Session] = set()
        self.modes: dict[str, str] = {}
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.requests: dict[str, int] = {}  # per node, of sessions already closed
        self.latency = latency.VolumeIo()   # timed requests of sessions already closed


class Agent:
    """The host agent: serves NBD to clients and multipaths it to the storage nodes."""

    def __init__(self, setup: HostSetup, links: dict[str, NodeLink] | None = None, *,
                 silence: float = 6.0) -> None:
        self.setup = setup
        self.config = setup.config
        self.clock = Clock()
        self._http: aiohttp.ClientSession | None = None
        self._given_links = links
        self.links: dict[str, NodeLink] = {}
        self.watchers: dict[str, NodeWatcher] = {}
        self.silence = silence
        self.exports: dict[str, ExportState] = {}
        self.connections: set[AgentProtocol] = set()
        self.totals = dict.fromkeys(_COUNTERS, 0)
        self.refusals: deque[dict[str, Any]] = deque(maxlen=20)
        self.started = time.monotonic()
        self._server: asyncio.base_events.Server | None = None
        self._unix: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.nbd_port = 0
        self.api_port = 0
        self.faults: HostFaults | None = None
        self.switching = Switching(self.links)
        self.native = False  # sessions use the native data path (decided at start)
        self.guard = Guard()  # the TCP listener's TLS policy (the Unix socket stays plain)

    # ---- Hooks for sessions -----------------------------------------------

    def events_up(self, node: str) -> bool:
        w = self.watchers.get(node)
        return w is not None and w.up

    def count(self, export: str, what: str, n: int = 1) -> None:
        self.totals[what] = self.totals.get(what, 0) + n
        st = self.exports.get(export)
        if st is not None:
            st.counters[what] = st.counters.get(what, 0) + n

    def _state(self, name: str) -> ExportState:
        st = self.exports.get(name)
        if st is None:
            st = self.exports[name] = ExportState(name)
        return st

    def register(self, session: Session) -> None:
        st = self._state(session.export)
        st.sessions.add(session)
        self.count(session.export, "sessions_total")

    def unregister(self, session: Session) -> None:
        st = self.exports.get(session.export)
        if st is None:
            return
        st.sessions.discard(session)
        latency.add(st.latency, session.take_latency())
        for p in session.paths:
            st.requests[p.node] = st.requests.get(p.node, 0) + p.requests

    # ---- resolution -------------------------------------------------------

    async def _probe(self, name: str) -> dict[str, dict[str, Any] | BaseException | None]:
        async def one(link: NodeLink) -> dict[str, Any] | BaseException | None:
            try:
                return await link.export(name)
            except NodeUnreachable as e:
                return e

        names = list(self.links)
        got = await asyncio.gather(*(one(self.links[n]) for n in names))
        return dict(zip(names, got, strict=True))

    async def resolve(self, name: str, *, connect: bool, peer: str = ""
                      ) -> tuple[ExportInfo | None, Session | None]:
        """Find `name` on the path nodes; check they agree; optionally open a session."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.hold_timeout
        delay = 0.1
        while True:
            views = await self._probe(name)
            found = {n: v for n, v in views.items() if isinstance(v, dict)}
            unreachable = {n: v for n, v in views.items() if isinstance(v, BaseException)}
            if found or not unreachable or loop.time() + delay > deadline:
                break
            # No node answered: hold the negotiation like I/O, up to hold_timeout.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if not found:
            if not unreachable:
                return None, None
            why = "; ".join(f"{n}: {e}" for n, e in unreachable.items())
            return ExportInfo(name, 0, blocked=f"no storage node could be asked about "
                                                f"export {name!r} ({why})"), None
        items = list(found.items())
        first_node, first = items[0]
        ident: dict[str, Any] = first["virtual_identity"]
        for node, view in items[1:]:
            other = view["virtual_identity"]
            if other != ident:
                diff = identity_diff(ident, other)
                msg = (f"export {name!r} is not the same volume on node {first_node} and node "
                       f"{node} ({diff}); the host agent will not use them as one device")
                log.error("virtual identity mismatch, export refused",
                          extra={"export": name, "nodes": [first_node, node], "diff": diff,
                                 "peer": peer})
                self.refusals.append({"time": round(time.time(), 3), "export": name,
                                      "peer": peer, "message": msg})
                self._state(name)
                self.count(name, "refused")
                return ExportInfo(name, int(ident.get("size") or 0), blocked=msg), None
        st = self._state(name)
        st.identity = ident
        for node, view in found.items():
            if isinstance(view.get("io_mode"), str):
                st.modes[node] = view["io_mode"]
        try:
            size = int(ident["size"])
        except (KeyError, TypeError, ValueError):
            return ExportInfo(name, 0, blocked=f"export {name!r}: node {first_node} reported "
                                               "no usable size"), None
        info = ExportInfo(name, size, description=str(ident.get("description") or ""))
        if not connect:
            return info, None
        cls = RelaySession if self.native else Session
        session = cls(self, name, ident, list(self.links.values()),
                      hold_timeout=self.config.hold_timeout,
                      io_timeout=self.config.io_timeout, peer=peer)
        try:
            await session.open(views)
        except BaseException:
            session.close()
            raise
        info.read_only = session.read_only
        return info, session

    async def list_exports(self) -> list[ExportInfo]:
        """Exports every node that has them agrees on (for NBD_OPT_LIST)."""
        async def one(link: NodeLink) -> list[dict[str, Any]]:
            try:
                return await link.volumes()
            except NodeUnreachable:
                return []

        lists = await asyncio.gather(*(one(link) for link in self.links.values()))
        idents: dict[str, list[dict[str, Any]]] = {}
        for vols in lists:
            for v in vols:
                ident = v.get("virtual_identity")
                name = v.get("export_name")
                if isinstance(ident, dict) and isinstance(name, str):
                    idents.setdefault(name, []).append(ident)
        out = []
        for name in sorted(idents):
            group = idents[name]
            if all(i == group[0] for i in group):
                out.append(ExportInfo(name, int(group[0].get("size") or 0),
                                      description=str(group[0].get("description") or "")))
        return out

    # ---- node events ------------------------------------------------------

    def on_node_event(self, node: str, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        export = ev.get("export")
        if not isinstance(export, str):
            return
        if kind in ("switched", "switched_back"):
            self.switching.on_event(node, export, ev)
            return
        st = self.exports.get(export)
        if kind == "io_mode":
            mode = ev.get("mode")
            if not isinstance(mode, str):
                return
            log.info("node pushed an I/O mode change", extra={
                "node": node, "export": export, "mode": mode, "seq": ev.get("seq")})
            if st is None:
                return
            st.modes[node] = mode
            reason = ev.get("reason") or ""
            for s in list(st.sessions):
                s.node_mode(node, mode, f"node {node} put {export!r} in I/O mode {mode}"
                                        f"{': ' + reason if reason else ''}")
        elif kind in ("volume_created", "volume_deleted", "volume_resized") and st is not None:
            for s in list(st.sessions):
                s.kick(node)

    def on_stream_state(self, node: str, up: bool) -> None:
        log.info("node event stream " + ("up" if up else "down"), extra={"node": node})
        if up:
            # Events may have been missed while the stream was down: read the present.
            task = asyncio.get_running_loop().create_task(self._refresh(node))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refresh(self, node: str) -> None:
        link = self.links[node]
        for name, st in list(self.exports.items()):
            if not st.sessions:
                continue
            try:
                view = await link.export(name)
            except NodeUnreachable:
                return
            if view is None:
                continue
            mode = view.get("io_mode")
            if isinstance(mode, str):
                st.modes[node] = mode
                for s in list(st.sessions):
                    s.node_mode(node, mode)

    # ---- lifecycle ----------------------------------------------------------

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.clock.now = loop.time()
            for st in self.exports.values():
                for s in list(st.sessions):
                    s.check_stalls(self.clock.now)
            await asyncio.sleep(TICK)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.clock.now = loop.time()
        host, port = split_hostport(self.config.nbd)
        ahost, aport = split_hostport(self.config.api)
        if self._given_links is not None:
            self.links.update(self._given_links)
        else:
            self._http = api_session(self.setup)
            self.links.update({n: HttpNodeLink(n, addr, self._http, self.setup.secret)
                               for n, addr in self.setup.nodes.items()})
            try:
                self.guard = apply_tls(self.setup, self.links)
            except ClusterError as e:  # certificates or PSK file that cannot be used
                await self._close_http()
                raise AgentStartError(str(e)) from None
            self.faults = HostFaults(self.setup.fault_log, self.config.sinks,
                                     self.setup.cluster_name)
        self.native = self.config.data_path == "native" and usable_for(len(self.links)) \
            and plain_only(self.guard, self.links)
        if self.config.data_path == "native" and not self.native:
            log.warning("native data path not used (TLS on, or unavailable): the Python one",
                        extra={"paths": len(self.links)})
        try:
            self._server = await loop.create_server(lambda: AgentProtocol(self, self.guard),
                                                    host, port,
                                                    reuse_address=True, backlog=256)
        except OSError as e:
            await self._close_http()
            raise AgentStartError(f"cannot listen for NBD on {host}:{port}: "
                                  f"{e.strerror}") from e
        self.nbd_port = self._server.sockets[0].getsockname()[1]
        if self.setup.socket is not None:
            unix_guard = limited(self.setup, unix=True)
            try:
                self._unix = await loop.create_unix_server(
                    lambda: AgentProtocol(self, unix_guard), _claim_socket(self.setup.socket),
                    backlog=256)
            except OSError as e:
                await self.stop()
                raise AgentStartError(f"cannot listen for NBD on {self.setup.socket}: "
                                      f"{e.strerror or e}") from e
        try:  # a real agent (not given its links by a test) guards its API with tokens
            ctx, access = api_access(self.setup) if self._given_links is None else (None, None)
        except (ClusterError, TokenError) as e:
            await self.stop()
            raise AgentStartError(str(e)) from None
        app = make_app(nbd=self.config.nbd, secret=self.setup.secret, report=self.status,
                       switches=self.switching, faults=self.faults, access=access)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=STOP_WAIT)
        await self._runner.setup()
        site = api_site(self._runner, ahost, aport, ctx, "host agent")
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise AgentStartError(f"cannot listen for the API on {ahost}:{aport}: "
                                  f"{e.strerror}") from e
        socks = getattr(site._server, "sockets", None)
        if socks:
            self.api_port = socks[0].getsockname()[1]
        for name, link in self.links.items():
            w = NodeWatcher(link, self.on_node_event, self.on_stream_state,
                            silence=self.silence)
            self.watchers[name] = w
            w.start()
        if self.faults is not None and self._http is not None:
            self.faults.start(self._http, {n: a.api_url for n, a in self.setup.nodes.items()},
                              {"Authorization": f"Bearer {self.setup.secret}"}
                              if self.setup.secret else {})
        self._ticker = loop.create_task(self._tick())
        task = loop.create_task(self.switching.load())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("host agent serving", extra={"nbd": self.config.nbd, "api": self.config.api,
                                              "socket": self.setup.socket,
                                              "nodes": list(self.links), "pid": os.getpid(),
                                              "hold_timeout": self.config.hold_timeout,
                                              "data_path": "native" if self.native
                                              else "python"})

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def stop(self) -> None:
        """Stop serving, promptly whatever state the nodes and clients are in: held
        requests fail (NBD_ESHUTDOWN), every path and client connection is closed, every
        task ends, and no wait here is unbounded (a dead node must not hold it up)."""
        if self._server is not None:
            self._server.close()
        if self._unix is not None:
            self._unix.close()
            self._unix = None
            with contextlib.suppress(OSError):
                os.unlink(self.setup.socket)  # type: ignore[arg-type]
        if self._ticker is not None:
            self._ticker.cancel()
        why = "the host agent is shutting down"
        for st in self.exports.values():
            for s in list(st.sessions):
                s.shutdown(why)
        for c in list(self.connections):
            c.shutdown()
        tasks: list[asyncio.Task[Any]] = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if self._ticker is not None:
            tasks.append(self._ticker)
        await asyncio.gather(*(w.stop(STOP_WAIT) for w in self.watchers.values()))
        if self.faults is not None:
            await self.faults.stop()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                await asyncio.wait_for(runner.cleanup(), STOP_WAIT)
            except TimeoutError:
                log.warning("status API did not close in time")
        try:
            await asyncio.wait_for(self._close_http(), STOP_WAIT)
        except TimeoutError:
            log.warning("node API connections did not close in time")
        log.info("host agent stopped")

    # ---- status -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        exports: dict[str, Any] = {}
        held = 0
        for name, st in sorted(self.exports.items()):
            sessions = list(st.sessions)
            paths: dict[str, Any] = {}
            for node in self.links:
                states = [s.by_node[node] for s in sessions if node in s.by_node]
                up = sum(1 for p in states if p.state is PathState.UP)
                if up:
                    state = "up"
                elif any(p.state is PathState.BLOCKED for p in states) \
                        or st.modes.get(node) == "block":
                    state = "blocked"
                elif any(p.state is PathState.MISMATCH for p in states):
                    state = "mismatch"
                elif any(p.state is PathState.ABSENT for p in states):
                    state = "absent"
                elif states:
                    state = "down"
                else:
                    state = "idle"
                reasons = [p.reason for p in states if p.reason]
                mode = st.modes.get(node)
                w = self.watchers.get(node)
                if w is not None and not w.up and state in ("idle", "down"):
                    # an unreachable node's path is down, and its last I/O mode is history
                    state, mode = "down", None
                    reasons.insert(0, f"node {node} not reachable: {w.last_error or '?'}")
                paths[node] = {
                    "state": state, "io_mode": mode, "connections": up,
                    "inflight": sum(p.inflight for p in states),
                    "requests": st.requests.get(node, 0) + sum(p.requests for p in states),
                    "reason": reasons[0] if reasons else ""}
            ex_held = sum(s.held_count() for s in sessions)
            held += ex_held
            timed = latency.VolumeIo()
            for vio in (st.latency, *(s.take_latency() for s in sessions)):
                latency.add(timed, vio)
            exports[name] = {"identity": st.identity, "sessions": len(sessions),
                             "held": ex_held, "paths": paths, **st.counters,
                             "latency": latency.as_json(timed)}
        return {
            "component": "host", "version": __version__, "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "nbd": self.config.nbd, "api": self.config.api,
            "socket": self.setup.socket if self._unix is not None else None,
            "hold_timeout": self.config.hold_timeout, "io_timeout": self.config.io_timeout,
            "data_path": "native" if self.native else "python",
            "nodes": {n: {"nbd": f"{link.nbd[0]}:{link.nbd[1]}", "events": w.status()}
                      for n, link in self.links.items()
                      for w in [self.watchers.get(n)] if w is not None},
            "connections": len(self.connections),
            "held": held, "held_total": self.totals["held_total"],
            "failovers": self.totals["failovers"],
            "retries": self.totals["retries"], "hold_failed": self.totals["hold_failed"],
            "refused": list(self.refusals),
            "exports": exports,
            "sessions": [s.status() for st in self.exports.values() for s in st.sessions],
            "faults": None if self.faults is None else self.faults.status(),
            "switching": self.switching.table,
        }


def _claim_socket(path: str) -> str:
    """Make `path` free for a Unix socket listener: a socket left by an agent that died
    is removed, but never a live one or a file that is not a socket."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "the path is longer than a Unix socket allows "
                      f"({UNIX_PATH_MAX} bytes)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return path
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens on it
        return path
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on it")


class AgentStartError(Exception):
    """The agent cannot start (port taken...)."""


__all__ = ["Agent", "AgentStartError"]
