"""All peer links of one node: listening, dialing the peers whose names sort after
this node's with backoff, and declaring a link down after `DEAD_AFTER` seconds without
traffic (a cut TCP does not notice)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from twinvol import clock
from twinvol.cluster import ClusterConfig
from twinvol.nbd.guard import describe_tls_error
from twinvol.replication.peer import (
    DEAD_AFTER,
    HANDSHAKE_TIMEOUT,
    PING_EVERY,
    Handler,
    PeerDown,
    PeerLink,
)
from twinvol.tls.context import peer_contexts

log = logging.getLogger("twinvol.peer")


class PeerService:
    """All peer links of one node: listening, dialing with backoff, liveness."""

    def __init__(self, cluster: ClusterConfig, node: str, handler: Handler,
                 on_up: Callable[[str], None], on_down: Callable[[str, str], None],
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.secret = cluster.cluster.secret
        self.handler = handler
        self.on_up = on_up
        self.on_down = on_down
        self.on_refused = on_refused or (lambda _p, _r: None)
        self.links: dict[str, PeerLink] = {}
        tls = peer_contexts(cluster, node)  # (accept, dial) with [tls] peer = true
        self.tls_accept = tls[0] if tls else None
        self.tls_dial = tls[1] if tls else None
        self._dial_refusals: dict[str, str] = {}  # last TLS refusal logged per peer
        self._listener: socket.socket | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def peers(self) -> list[str]:
        return [n for n, cfg in self.cluster.nodes.items() if n != self.node and cfg.peer]

    def link(self, peer: str) -> PeerLink:
        link = self.links.get(peer)
        if link is None or link.closed or not link.authed:
            raise PeerDown(f"no link to node {peer}")
        return link

    def is_up(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.authed and not link.closed

    async def start(self) -> None:
        cfg = self.cluster.node(self.node)
        if cfg.peer is None:
            return
        host, port = cfg.peer_hostport
        loop = asyncio.get_running_loop()
        if self.tls_accept is not None:
            lsock = self._listener = socket.create_server((host, port), backlog=64)
            lsock.setblocking(False)
            self._tasks.append(asyncio.create_task(self._accept_tls(lsock)))
        else:
            self._server = await loop.create_server(lambda: PeerLink(self, None), host, port,
                                                    reuse_address=True)
        for peer in self.peers():
            if self.node < peer:
                self._tasks.append(asyncio.create_task(self._dial_forever(peer)))
        self._tasks.append(asyncio.create_task(self._liveness()))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        for link in list(self.links.values()):
            link._fail("node stopping")

    async def _dial_forever(self, peer: str) -> None:
        delay = 0.1
        host, port = self.cluster.node(peer).peer_hostport
        loop = asyncio.get_running_loop()
        while not self._stopping:
            link = self.links.get(peer)
            if link is not None and not link.closed:
                await asyncio.sleep(0.2)
                continue
            try:
                _t, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: PeerLink(self, peer), host, port,
                                           ssl=self.tls_dial,
                                           ssl_handshake_timeout=HANDSHAKE_TIMEOUT
                                           if self.tls_dial else None),
                    HANDSHAKE_TIMEOUT)
                await asyncio.wait_for(proto.ready, HANDSHAKE_TIMEOUT)
                delay = 0.1
                self._dial_refusals.pop(peer, None)
            except ssl.SSLError as e:
                reason = f"TLS handshake failed: {describe_tls_error(e, 'the peer')}"
                if self._dial_refusals.get(peer) != reason:  # once per reason, not per retry
                    self._dial_refusals[peer] = reason
                    log.warning("peer refused", extra={"peer": peer, "reason": reason})
                    self.on_refused(peer, reason)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (OSError, PeerDown, TimeoutError) as e:
                log.debug("peer dial failed", extra={"peer": peer, "error": str(e)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _liveness(self) -> None:
        while not self._stopping:
            await asyncio.sleep(PING_EVERY)
            now = clock.monotonic()
            for link in list(self.links.values()):
                if link.closed:
                    continue
                if now - link.last_rx > DEAD_AFTER:
                    link._fail(f"no traffic for {DEAD_AFTER}s")
                else:
                    link.ping()

    async def _accept_tls(self, lsock: socket.socket) -> None:
        """Accept peers over mutual TLS ([tls] peer = true). Each socket is accepted here
        and handed to TLS before any byte is read, so a refused handshake is known and
        logged once, as one line, with its reason."""
        assert self.tls_accept is not None
        loop = asyncio.get_running_loop()
        while not self._stopping:
            conn, addr = await loop.sock_accept(lsock)
            self._tasks.append(asyncio.create_task(self._handshake(conn, addr)))

    async def _handshake(self, conn: socket.socket, addr: object) -> None:
        assert self.tls_accept is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: PeerLink(self, None), conn,
                                               ssl=self.tls_accept,
                                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            reason = f"TLS handshake failed: {describe_tls_error(e, 'the peer')}"
            log.warning("peer refused", extra={"addr": str(addr), "reason": reason})
            self.on_refused("?", reason)
            conn.close()

    def link_up(self, link: PeerLink) -> None:
        assert link.peer is not None
        old = self.links.get(link.peer)
        if old is not None and old is not link and not old.closed:
            old._fail("replaced by a new link")
        self.links[link.peer] = link
        log.info("peer link up", extra={"peer": link.peer})
        self.on_up(link.peer)

    def link_down(self, link: PeerLink, reason: str) -> None:
        assert link.peer is not None
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
            log.warning("peer link down", extra={"peer": link.peer, "reason": reason})
            self.on_down(link.peer, reason)
