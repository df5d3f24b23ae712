"""HTTPS for every twinvol HTTP API (nodes, host agent, witness, VM hosts) with client
certificates, and one clear log line for each refused handshake.

asyncio and uvloop report a failed server-side handshake only in debug mode, so a caller
with a foreign certificate or plain HTTP would be dropped without a trace. `TlsSite`
awaits each handshake itself, says why it failed, and hands an accepted connection to
aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import Any

from aiohttp import web

from twinvol.nbd.guard import describe_tls_error
from twinvol.tls.context import client_context, server_context

log = logging.getLogger("twinvol.tls")

HANDSHAKE_TIMEOUT = 10.0  # seconds a caller has to finish the TLS handshake


class TlsSite(web.BaseSite):
    """A TCP site that accepts connections itself and lets the loop do each TLS handshake
    (connect_accepted_socket): a failed one is logged with its reason, an accepted one
    goes to aiohttp. (A protocol doing start_tls after accept would race the ClientHello
    on uvloop, which starts reading right after connection_made.)"""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ctx: ssl.SSLContext,
                 what: str) -> None:
        super().__init__(runner)
        self._host, self._port, self._ctx, self._what = host, port, ctx, what
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    async def start(self) -> None:
        await super().start()
        family = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server((self._host, self._port), family=family,
                                          backlog=self._backlog)
        self._sock.setblocking(False)
        self._spawn(self._accept())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # out of descriptors, say: do not spin
                log.warning("https accept failed", extra={"api": self._what, "error": str(e)})
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        try:
            peer = conn.getpeername()
            who = f"{peer[0]}:{peer[1]}"
        except OSError:
            who = "?"
        server: Any = self._runner.server
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                server, conn, ssl=self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as e:
            log.warning("https connection refused", extra={
                "api": self._what, "peer": who, "reason": describe_tls_error(e)})
            conn.close()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await super().stop()


def api_site(runner: web.BaseRunner, host: str, port: int, ctx: ssl.SSLContext | None,
             what: str) -> web.BaseSite:
    """The site an API listens on: HTTPS with logged refusals when `ctx` is given."""
    if ctx is None:
        return web.TCPSite(runner, host, port, reuse_address=True)
    return TlsSite(runner, host, port, ctx, what)


def service_server(directory: str | None) -> ssl.SSLContext | None:
    """The server side of the host agent's, witness's or a VM host's API: the directory's
    server certificate, and callers must show one signed by its CA (None: plain HTTP)."""
    return None if directory is None else server_context(directory, verify_clients=True)


def service_client(directory: str | None, node: str | None = None) -> ssl.SSLContext | None:
    """What a caller of those APIs shows: a node its own certificate, anyone else the
    directory's client certificate (None: plain HTTP)."""
    if directory is None:
        return None
    if node is not None and not os.path.isdir(os.path.join(directory, "nodes", node)):
        node = None
    return client_context(directory, node=node)
