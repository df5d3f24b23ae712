"""Thin asyncio layer around the sans-IO `ServerConnection`.

Fast operations (reads and writes to a page-cached file, hole punching,
allocation maps) run inline on the event loop, which is what keeps small I/O
fast in Python; fdatasync (FLUSH, FUA) runs on a thread so other requests keep
flowing and their replies may overtake it (replies are out of order by design).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from time import perf_counter_ns
from typing import Protocol

from twinvol import clock
from twinvol.nbd.constants import NEED_DATA, Cmd, Err
from twinvol.nbd.guard import Guard, Standing, describe_tls_error
from twinvol.nbd.iostats import SAMPLE_MASK, IoStats, VolumeIo
from twinvol.nbd.server import FAST_ZERO, FUA, NO_HOLE, REQ_ONE
from twinvol.nbd.server_events import (
    Disconnect,
    ExportInfo,
    ExportProvider,
    Ready,
    Request,
    StartTls,
)
from twinvol.receive import Receiver, nodelay
from twinvol.storage.backing import NotFast

log = logging.getLogger("twinvol.nbd")

MAX_PENDING = 256  # async operations in flight per connection before reading pauses


class Backend(Protocol):
    """The block operations an export needs (a `BackingStore` has them all)."""

    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None: ...
    def flush(self) -> None: ...
    def cache(self, offset: int, length: int) -> None: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...


class ExportRegistry(ExportProvider, Protocol):
    """Export lookup plus attaching a connection to an export's backend."""

    def attach(self, export: ExportInfo) -> Backend: ...
    def detach(self, export: ExportInfo) -> None: ...


def nbd_errno(e: OSError) -> int:
    """Map a host errno to the NBD error value the spec asks for."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return Err.ENOSPC
    if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return Err.EPERM
    if e.errno == errno.EINVAL:
        return Err.EINVAL
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return Err.ENOTSUP
    return Err.EIO


LARGE_WRITE = 256 * 1024
SMALL_READ = 4096
_ASYNC_CMDS = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.FLUSH)


class NbdServerProtocol(asyncio.BufferedProtocol):
    """One client connection.

    A buffered protocol: the loop receives straight into a pending write's
    payload buffer when there is one, otherwise into a reused scratch buffer,
    so no bytes object is allocated per receive.
    """

    def __init__(self, registry: ExportRegistry, executor: Executor,
                 connections: dict[NbdServerProtocol, None], stats: IoStats | None = None,
                 guard: Guard | None = None) -> None:
        self.registry = registry
        self.stats = stats if stats is not None else IoStats()
        self.executor = executor
        self.connections = connections
        self.guard = guard = guard if guard is not None else Guard()
        self.conn = guard.connection(registry)
        self._standing = Standing(guard, log)  # counted, and timed until negotiated
        self._tls_early: bytearray | None = None  # bytes that came in during the handshake
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.export: ExportInfo | None = None
        self._vio = VolumeIo()  # this export's counters in `stats`, once negotiated
        self.peer = "?"
        self._async = False  # the backend's writes complete asynchronously (submit/start)
        self._start: Callable[..., None] | None = None
        self._inflight = 0  # requests started and not yet answered
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._paused_pending = False
        self._write_paused = False
        self._closing = False
        self._rx = Receiver()
        self._replies: list[bytes | bytearray | memoryview] = []
        self._flush_pending = False
        self._large = False  # the last request was a large write (see get_buffer)
        self._held = False  # reading paused while the backend is swapped (see rebind)

    # ---- asyncio callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()  # asking per call costs a getpid()
        nodelay(transport)
        if not self._standing.admit(transport, self._too_slow):
            self._closing = True
            return
        self.peer = self._standing.peer
        self.connections[self] = None
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def _too_slow(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _start_tls(self) -> None:
        """STARTTLS was acknowledged: upgrade with the loop's own TLS (the state machine
        stays sans-IO; it sees plaintext before and after)."""
        self._tls_early = bytearray()
        assert self.transport is not None
        self.transport.pause_reading()  # the ClientHello is for start_tls, not for us
        self._loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        raw = self.transport
        assert raw is not None
        try:
            tls = await self.guard.upgrade(raw, self)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as e:
            log.warning("nbd TLS handshake failed, connection dropped",
                        extra={"peer": self.peer, "reason": describe_tls_error(e)})
            self._closing = True
            raw.abort()
            self.connection_lost(e)
            return
        if tls is None or self._closing:
            return
        self.transport = tls
        early, self._tls_early = self._tls_early, None
        self.conn.tls_started()
        cert = tls.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in cert.get("subject", ()))
        log.info("nbd TLS established", extra={"peer": self.peer, "version": tls.get_extra_info(
            "ssl_object").version(), "client_cert": subject.get("commonName", "")})
        if early:
            self.conn.receive_data(bytes(early))
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        # After a large write the next is likely large too: read little more than its
        # header, so its payload goes straight into its own buffer (no copy).
        return self._rx.buffer(self.conn.payload_buffer(), SMALL_READ if self._large else 0)

    def buffer_updated(self, nbytes: int) -> None:
        data = self._rx.received(nbytes)
        if self._tls_early is not None:
            self._tls_early += self._rx.scratch[:nbytes]
            return
        if data is None:
            self.conn.payload_received(nbytes)
        else:
            self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.pop(self, None)
        self._closing = True
        self._standing.release()
        if self.export is not None:
            self.registry.detach(self.export)
            self.export = None
            self.backend = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # ---- event handling -------------------------------------------------

    def _pump(self) -> None:
        """Handle every event the received bytes complete; send all replies in one write."""
        conn = self.conn
        transport = self.transport
        assert transport is not None
        replies = self._replies
        while not self._closing:
            ev = conn.next_event()
            if conn.out:
                replies.append(conn.data_to_send())
            if ev is NEED_DATA:
                break
            if type(ev) is Request:
                self._handle(ev)
            elif type(ev) is Ready:
                self._ready(ev)
            elif type(ev) is StartTls:
                self._flush_replies()
                self._start_tls()
                break
            elif type(ev) is Disconnect:
                self._flush_replies()
                self._disconnect(ev)
                break
        self._flush_replies()

    def _schedule_flush(self) -> None:
        """Replies completed by callbacks in one loop iteration leave in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_pending = False
        self._flush_replies()

    def _gate_closed(self) -> bool:
        """The export's lease ran out: answer nothing more and drop the connection, so
        the client (or the host agent) goes to a copy that may serve."""
        exp = self.export
        if exp is None:
            return False
        until = exp.serve_until
        if until == math.inf or until > clock.monotonic():
            return False
        log.warning("lease expired: replies withheld, connection dropped",
                    extra={"peer": self.peer, "export": exp.name,
                           "replies": len(self._replies)})
        self._replies.clear()
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        return True

    def _flush_replies(self) -> None:
        replies = self._replies
        if replies and self.transport is not None:
            if self._gate_closed():
                return
            if len(replies) == 1:
                self.transport.write(replies[0])
            else:
                self.transport.writelines(replies)
            replies.clear()

    def _ready(self, ev: Ready) -> None:
        self._standing.negotiated()
        self.export = ev.export
        self._vio = self.stats.volume(ev.export.name)
        self._set_backend(self.registry.attach(ev.export))
        log.info("nbd client connected", extra={"peer": self.peer, "export": ev.export.name,
                                                "structured": ev.structured})

    def _set_backend(self, backend: Backend) -> None:
        """Install the backend, and look up once how its writes are done."""
        self.backend = backend
        self._async = bool(getattr(backend, "async_writes", False))
        self._start = getattr(backend, "start", None)

    def _disconnect(self, ev: Disconnect) -> None:
        assert self.transport is not None
        self._closing = True
        if ev.error:
            self.stats.protocol_errors += 1
            log.warning("nbd protocol error, hard disconnect",
                        extra={"peer": self.peer, "reason": ev.reason})
            self.transport.abort()
            return
        if self._inflight:
            self.idle().add_done_callback(lambda _f: self._close())
        else:
            self._close()

    async def drain_and_close(self, timeout: float) -> None:
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
        if self._inflight:
            await asyncio.wait([self.idle()], timeout=timeout)
        self._flush_replies()
        transport.close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _handle(self, req: Request) -> None:
        backend = self.backend
        assert backend is not None
        stats = self.stats
        stats.requests += 1
        t0 = 0 if stats.requests & SAMPLE_MASK else perf_counter_ns()  # time 1 in SAMPLE
        cmd = req.command
        conn = self.conn
        replies = self._replies
        self._large = req.length >= LARGE_WRITE and cmd == Cmd.WRITE
        if self._async and cmd in _ASYNC_CMDS:
            self._submit(req, t0)
            return
        try:
            if cmd == Cmd.READ:
                data = backend.pread(req.offset, req.length)
                replies.extend(conn.reply_read(req.cookie, req.offset, data))
                ops = self._vio.read
                ops.count += 1
                ops.bytes += req.length
                if t0:
                    ops.time(perf_counter_ns() - t0)
                return
            if cmd == Cmd.WRITE:
                assert req.data is not None
                backend.pwrite(req.offset, req.data)
            elif cmd == Cmd.FLUSH:
                self._sync(req)
                return
            elif cmd == Cmd.TRIM:
                backend.trim(req.offset, req.length)
            elif cmd == Cmd.WRITE_ZEROES:
                backend.write_zeroes(req.offset, req.length, no_hole=bool(req.flags & NO_HOLE),
                                     fast=bool(req.flags & FAST_ZERO))
            elif cmd == Cmd.BLOCK_STATUS:
                extents = backend.extents(req.offset, req.length)
                if req.flags & REQ_ONE:
                    extents = [(min(extents[0][0], req.length), extents[0][1])]
                replies.append(conn.reply_block_status(req.cookie, extents))
                return
            elif cmd == Cmd.CACHE:
                backend.cache(req.offset, req.length)
        except NotFast as e:
            replies.extend(conn.reply_error(req.cookie, Err.ENOTSUP, str(e)))
            return
        except OSError as e:
            log.error("backing storage error", extra={"peer": self.peer, "op": cmd.name,
                                                      "offset": req.offset, "errno": e.errno})
            self.stats.error(cmd.name, self.export, req.offset, e)
            replies.extend(conn.reply_error(req.cookie, nbd_errno(e),
                                            f"{cmd.name} failed: {e.strerror}"))
            return
        ops = self._vio.write if cmd == Cmd.WRITE else self._vio.other
        ops.count += 1
        if cmd == Cmd.WRITE:
            ops.bytes += req.length
        if t0:
            ops.time(perf_counter_ns() - t0)
        if req.flags & FUA:
            self._sync(req)
        else:
            replies.append(conn.reply_ok(req.cookie))

    def _submit(self, req: Request, t0: int) -> None:
        """Hand a write to an asynchronous (replicated) backend; reply when it completes.

        A backend with `start` calls back when done (no Future per request); otherwise
        `submit` returns an awaitable."""
        backend = self.backend
        data = None if req.data is None else self.conn.own_payload(req.data)
        self._began()
        cookie, command = req.cookie, req.command
        ops = self._vio.write if command == Cmd.WRITE else self._vio.other
        ops.count += 1  # counted when taken; timed (1 in SAMPLE) when answered
        if command == Cmd.WRITE:
            ops.bytes += req.length

        def done(exc: BaseException | None) -> None:
            self._ended()
            if self.transport is None or self.transport.is_closing():
                return
            if exc is None:
                if t0:
                    ops.time(perf_counter_ns() - t0)
                self._replies.append(self.conn.reply_ok(cookie))
            else:
                err = getattr(exc, "errno", None)
                if isinstance(exc, OSError):
                    err = nbd_errno(exc)
                    self.stats.error(command.name, self.export, 0, exc)
                elif isinstance(exc, NotFast):
                    err = Err.ENOTSUP
                elif isinstance(exc, asyncio.CancelledError):
                    exc = Exception("cancelled")
                self._replies.extend(self.conn.reply_error(
                    cookie, int(err) if isinstance(err, int) else Err.EIO,
                    f"{command.name} failed: {exc}"))
            self._schedule_flush()

        start = self._start
        if start is not None:
            start(int(command), req.offset, req.length, data, req.flags, done)
            return
        fut = asyncio.ensure_future(backend.submit(  # type: ignore[union-attr]
            int(command), req.offset, req.length, data, req.flags))  # no-op on a Future
        fut.add_done_callback(
            lambda f: done(asyncio.CancelledError() if f.cancelled() else f.exception()))

    def _began(self) -> None:
        self._inflight += 1
        if self._inflight >= MAX_PENDING:
            self._update_reading()

    def _ended(self) -> None:
        self._inflight -= 1
        if self._paused_pending:
            self._update_reading()
        if not self._inflight and self._idle_waiters:
            for w in self._idle_waiters:
                if not w.done():
                    w.set_result(None)
            self._idle_waiters.clear()

    def idle(self) -> asyncio.Future[None]:
        """Done once no request of this connection is in flight."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._inflight:
            self._idle_waiters.append(fut)
        else:
            fut.set_result(None)
        return fut

    def _sync(self, req: Request) -> None:
        """fdatasync off the loop, then reply; later requests do not wait for it."""
        backend = self.backend
        assert backend is not None
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, backend.flush)
        self._began()
        started = loop.time()

        def done(f: asyncio.Future[None]) -> None:
            self._ended()
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                self.stats.error("FLUSH", self.export, 0, exc)
            elif self.stats.on_slow is not None and self.export is not None:
                self.stats.on_slow("FLUSH", self.export.name, loop.time() - started)
            if self.transport is None or self.transport.is_closing() or self._gate_closed():
                return
            if exc is None:
                self.transport.write(self.conn.reply_ok(req.cookie))
            else:
                err = nbd_errno(exc) if isinstance(exc, OSError) else Err.EIO
                self.transport.writelines(self.conn.reply_error(req.cookie, err,
                                                                f"flush failed: {exc}"))

        fut.add_done_callback(done)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._write_paused or self._held or self._inflight >= MAX_PENDING
        if pause and not self._paused_pending:
            self._paused_pending = True
            transport.pause_reading()
        elif not pause and self._paused_pending:
            self._paused_pending = False
            transport.resume_reading()
