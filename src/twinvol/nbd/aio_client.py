"""Thin asyncio layer around the sans-IO `ClientConnection`.

Two ways to issue requests, many in flight on one connection:

- `await client.pread(...)` etc. for ordinary code: errors raise `NbdError`,
  a dead socket raises `ConnectionLost`;
- `client.submit(cmd, offset, length, flags, data, done)` for the host agent's
  data path: no coroutine or future per request; `done` is called with the
  `Completed` event or a `ConnectionLost` instance.

Requests submitted in one loop iteration go out in one `writelines` (flushed
by `flush()` or, failing that, a single `call_soon`). Large read replies are
received straight into the request's buffer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

from twinvol.nbd.client import NEED_DATA, ClientConnection, ClientStateError, Phase, errname
from twinvol.nbd.client_events import (
    Closed,
    Completed,
    Negotiated,
    ProtocolError,
    Refused,
    TlsReady,
)
from twinvol.nbd.constants import Cmd, Err, Rep, TxFlag
from twinvol.receive import Receiver, nodelay
from twinvol.tls.psk import PskClientContext

log = logging.getLogger("twinvol.nbd.client")

PSK_TIMEOUT = 30.0  # seconds for a TLS-PSK handshake
DIRECT_RECV = 16 * 1024  # read data at least this big is received in place

Result = Completed | BaseException
Done = Callable[[Result], None]


class NbdError(Exception):
    """The server answered a request with an error (`errno` is the NBD error value)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"{errname(self.errno)}: {self.message}" if self.message else errname(self.errno)


class ConnectionLost(Exception):
    """The connection died (EOF, reset, protocol error or closed) before the reply came."""


class NegotiationError(Exception):
    """The server refused the export during the handshake (NBD_REP_ERR_*)."""

    def __init__(self, rep: int, message: str) -> None:
        super().__init__(rep, message)
        self.rep = rep
        self.message = message

    @property
    def policy(self) -> bool:
        """Refused by policy (e.g. a blocked copy of a pair), not because it is unknown."""
        return self.rep == Rep.ERR_POLICY

    def __str__(self) -> str:
        try:
            name = Rep(self.rep).name
        except ValueError:
            name = f"{self.rep:#x}"
        return f"NBD_REP_{name}: {self.message}"


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: NbdClient) -> None:
        self.client = client
        self.conn = client.conn
        self._rx = Receiver(DIRECT_RECV)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]
        nodelay(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx.buffer(self.conn.payload_buffer())

    def buffer_updated(self, nbytes: int) -> None:
        data = self._rx.received(nbytes)
        if data is None:
            self.conn.payload_received(nbytes)
        else:
            self.conn.receive_data(data)
        self.client._pump()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self.client._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(f"connection lost: {exc}" if exc else "connection closed")


class NbdClient:
    """One NBD connection to one export."""

    def __init__(self, export: str, *, structured: bool = True,
                 meta_context: bool = False,
                 tls: ssl.SSLContext | PskClientContext | None = None) -> None:
        self.conn = ClientConnection(export, structured=structured, meta_context=meta_context,
                                     tls=tls is not None)
        self._tls = tls
        self._host = ""
        self.export = export
        self.peer = ""
        self.info: Negotiated | None = None
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | bytearray | memoryview] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[Negotiated] | None = None
        self._closed: asyncio.Future[None] | None = None
        self.lost_reason: str | None = None
        # Called once when the connection dies, with the reason.
        self.on_lost: Callable[[str], None] | None = None
        # Called after each batch of replies has been dispatched (to batch onward writes).
        self.after_batch: Callable[[], None] | None = None

    # ---- connecting -----------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, export: str, *, structured: bool = True,
                      meta_context: bool = False, timeout: float = 10.0,
                      tls: ssl.SSLContext | PskClientContext | None = None) -> NbdClient:
        """Connect and negotiate (with `tls`: NBD_OPT_STARTTLS first, the server's
        certificate checked for `host`); raises NegotiationError, ConnectionLost, OSError
        (ssl.SSLError too) or TimeoutError."""
        self = cls(export, structured=structured, meta_context=meta_context, tls=tls)
        self._host = host
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._closed = loop.create_future()
        self.peer = f"{host}:{port}"
        async with asyncio.timeout(timeout):
            try:
                await loop.create_connection(lambda: _Protocol(self), host, port)
                self._write(self.conn.data_to_send())
                self.info = await self._ready
            except BaseException:
                self.abort()
                raise
        return self

    # ---- properties -----------------------------------------------------

    @property
    def size(self) -> int:
        return self.conn.size

    @property
    def flags(self) -> int:
        return self.conn.flags

    @property
    def read_only(self) -> bool:
        return bool(self.conn.flags & TxFlag.READ_ONLY)

    def can(self, flag: TxFlag) -> bool:
        return bool(self.conn.flags & flag)

    @property
    def meta_context(self) -> bool:
        return self.conn.meta_context_id is not None

    @property
    def alive(self) -> bool:
        return self.lost_reason is None and self.conn.phase is Phase.TRANSMISSION

    @property
    def inflight(self) -> int:
        return self.conn.inflight

    # ---- event handling -------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _pump(self) -> None:
        conn = self.conn
        next_event = conn.next_event
        while True:
            ev = next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, Completed):
                try:
                    ev.tag(ev)
                except Exception:  # a bug in a callback must not kill the parser
                    log.exception("NBD reply callback failed")
            elif type(ev) is Negotiated:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(ev)
            elif type(ev) is TlsReady:
                assert self._loop is not None
                self._loop.create_task(self._upgrade())
                break
            elif type(ev) is Refused:
                self._write(conn.data_to_send())  # NBD_OPT_ABORT
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(NegotiationError(ev.rep, ev.message))
            elif type(ev) is ProtocolError:
                log.warning("NBD server protocol error, hard disconnect",
                            extra={"peer": self.peer, "export": self.export,
                                   "reason": ev.reason})
                self._lost(f"protocol error: {ev.reason}")
                if self._transport is not None:
                    self._transport.abort()
                break
            elif type(ev) is Closed:
                self._lost(ev.reason)
                if self._transport is not None:
                    self._transport.close()
                break
        if conn.out:
            self._write(conn.data_to_send())
        if self.after_batch is not None:
            self.after_batch()

    async def _upgrade(self) -> None:
        """STARTTLS was acknowledged: TLS handshake on the same connection, then go on."""
        raw = self._transport
        assert raw is not None and self._loop is not None and self._tls is not None
        raw.pause_reading()
        try:
            if isinstance(self._tls, PskClientContext):  # pre-shared keys: a memory BIO
                tls: asyncio.Transport | None = await self._tls.start(
                    raw, raw.get_protocol(), PSK_TIMEOUT)
            else:
                tls = await self._loop.start_tls(raw, raw.get_protocol(), self._tls,
                                                 server_hostname=self._host)
        except (OSError, ConnectionError) as e:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(e)
            raw.abort()
            return
        if tls is None:
            return
        self._transport = tls
        self.conn.tls_started()
        self._write(self.conn.data_to_send())

    def _lost(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionLost(f"{self.peer}: {reason}"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._out.clear()
        tags = self.conn.take_inflight()
        if tags:
            exc = ConnectionLost(f"{self.peer}: {reason}")
            for tag in tags:
                try:
                    tag(exc)
                except Exception:
                    log.exception("NBD reply callback failed")
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb(reason)

    # ---- requests -------------------------------------------------------

    def submit(self, command: int, offset: int, length: int, flags: int,
               data: bytes | bytearray | memoryview | None, done: Done) -> None:
        """Queue a request; `done(result)` is called exactly once, never synchronously
        from inside `submit`.

        A write's `data` must stay unchanged until `done` runs (pass bytes).
        """
        conn = self.conn
        if self.lost_reason is not None or conn.phase is not Phase.TRANSMISSION:
            self._get_loop().call_soon(
                done, ConnectionLost(f"{self.peer}: {self.lost_reason or 'not connected'}"))
            return
        try:
            hdr = conn.request(command, offset, length, flags, done)
        except ClientStateError as e:  # e.g. block status without a metadata context
            self._get_loop().call_soon(
                done, Completed(done, 0, command, int(Err.EINVAL), f"{self.peer}: {e}"))
            return
        out = self._out
        out.append(hdr)
        if data is not None:
            out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._get_loop().call_soon(self.flush)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def flush(self) -> None:
        """Send every queued request now (one system call for a batch)."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
        out.clear()

    def _call(self, command: int, offset: int, length: int, flags: int,
              data: bytes | bytearray | memoryview | None = None) -> asyncio.Future[Completed]:
        fut: asyncio.Future[Completed] = self._get_loop().create_future()
        self.submit(command, offset, length, flags, data, partial(_resolve, fut))
        return fut

    async def pread(self, offset: int, length: int, flags: int = 0) -> bytes | bytearray:
        ev = await self._call(Cmd.READ, offset, length, flags)
        return ev.data if ev.data is not None else bytes(length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     flags: int = 0) -> None:
        await self._call(Cmd.WRITE, offset, len(data), flags, bytes(data))

    async def flush_cmd(self, flags: int = 0) -> None:
        """NBD_CMD_FLUSH (named so because `flush` sends queued bytes)."""
        await self._call(Cmd.FLUSH, 0, 0, flags)

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        await self._call(Cmd.TRIM, offset, length, flags)

    async def zero(self, offset: int, length: int, flags: int = 0) -> None:
        await self._call(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int, flags: int = 0) -> None:
        await self._call(Cmd.CACHE, offset, length, flags)

    async def block_status(self, offset: int, length: int,
                           flags: int = 0) -> list[tuple[int, int]]:
        ev = await self._call(Cmd.BLOCK_STATUS, offset, length, flags)
        assert ev.extents is not None
        return ev.extents

    # ---- closing --------------------------------------------------------

    def close(self) -> None:
        """Soft disconnect: NBD_CMD_DISC, then close (requests in flight fail)."""
        if self.conn.phase is Phase.TRANSMISSION and self.lost_reason is None:
            self.flush()
            self._write(self.conn.disconnect())
        if self._transport is not None:
            self._transport.close()

    def detach(self) -> int:
        """Hand the negotiated connection over as a socket file descriptor (the caller
        owns it and must close it) and forget it here. Only right after negotiation:
        nothing may be in flight or unsent (raises ConnectionLost otherwise)."""
        transport = self._transport
        if transport is None or not self.alive or self.conn.inflight \
                or transport.get_write_buffer_size():
            raise ConnectionLost("connection not idle, cannot hand it over")
        sock = transport.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        self.on_lost = None
        self.lost_reason = "handed over"
        # Closing our descriptor does not end the connection: `fd` still refers to it.
        transport.abort()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        return fd

    def abort(self) -> None:
        """Hard disconnect now."""
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Until the connection is gone (at once if it never connected). Cancelling the
        wait cancels only the wait."""
        closed = self._closed
        if closed is None or closed.done():
            return
        if self._transport is None:  # never connected: nothing will close
            closed.set_result(None)
            return
        await asyncio.shield(closed)


def _resolve(fut: asyncio.Future[Completed], res: Any) -> None:
    if fut.done():
        return
    if isinstance(res, BaseException):
        fut.set_exception(res)
    elif res.error:
        fut.set_exception(NbdError(res.error, res.message))
    else:
        fut.set_result(res)


__all__ = ["ConnectionLost", "NbdClient", "NbdError", "NegotiationError"]
