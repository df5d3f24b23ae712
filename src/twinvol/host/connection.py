"""One client's NBD connection to the host agent: negotiation, then transmission.

Negotiation uses the sans-IO `ServerConnection` unchanged. Its export lookups are
pure, but answering one needs the nodes (their view of the export's identity and
I/O mode, and path connections), so this protocol splits the client's option
stream itself: when an option naming an export is complete it asks the agent to
resolve that export first, and only then feeds the option to the state machine,
whose lookup now finds the answer ready. For NBD_OPT_GO/INFO the session's paths
are connected during resolution, so the first request finds them ready.

In transmission requests go to the session and its replies come back here
(`reply`); with the native data path the socket is handed to the relay instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import Any, Protocol

from twinvol.host.paths import Op
from twinvol.host.relay import RelaySession
from twinvol.host.session import Session
from twinvol.nbd.client_events import Completed
from twinvol.nbd.constants import IHAVEOPT, MAX_OPTION_DATA, NEED_DATA, Cmd, Opt
from twinvol.nbd.guard import Guard, Standing, describe_tls_error
from twinvol.nbd.server import Phase
from twinvol.nbd.server_events import Disconnect, ExportInfo, Ready, Request, StartTls
from twinvol.receive import Receiver, nodelay

log = logging.getLogger("twinvol.host")

MAX_OUTSTANDING = 256  # requests per client connection before reading from it pauses
MAX_NEGOTIATION_BACKLOG = 256 * 1024  # unfed option bytes before reading pauses
MAX_CANDIDATES = 4  # exports one connection may have open paths for while negotiating
_OPT_HDR = struct.Struct(">QII")
_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)


class AgentSide(Protocol):
    """What a client connection needs of the agent (host/agent.py; a protocol rather
    than an import: the agent module imports this one)."""

    connections: set[AgentProtocol]
    async def resolve(self, name: str, *, connect: bool, peer: str = ""
                      ) -> tuple[ExportInfo | None, Session | None]: ...
    async def list_exports(self) -> list[ExportInfo]: ...
    def register(self, session: Session) -> None: ...
    def unregister(self, session: Session) -> None: ...


class _ConnExports:
    """The `ExportProvider` of one client connection: answers resolved beforehand."""

    def __init__(self) -> None:
        self.resolved: dict[str, ExportInfo | None] = {}
        self.listed: list[ExportInfo] = []

    def lookup(self, name: str) -> ExportInfo | None:
        return self.resolved.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return self.listed


def _option_name(opt: int, data: bytes) -> str | None:
    """The export an option names (None when it names none or is malformed)."""
    if opt == Opt.EXPORT_NAME:
        raw = data
    elif opt in (Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        if len(data) < 4:
            return None
        (n,) = struct.unpack_from(">I", data)
        if n > len(data) - 4:
            return None
        raw = data[4:4 + n]
    else:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


class AgentProtocol(asyncio.BufferedProtocol):
    """One client connection to the agent."""

    def __init__(self, agent: AgentSide, guard: Guard | None = None) -> None:
        self.agent = agent
        self.exports = _ConnExports()
        self.guard = guard or Guard()
        self.conn = self.guard.connection(self.exports)
        self._standing = Standing(self.guard, log)  # the node's limits (nbd/guard.py)
        self._tls_pending = False  # STARTTLS acknowledged, handshake running
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: Session | None = None
        self.candidates: dict[str, Session] = {}  # sessions opened while negotiating
        self._go_done: set[str] = set()
        self._listed = False
        self._neg = bytearray()  # negotiation bytes not yet fed to the state machine
        self._flags_fed = False
        self._skip = 0
        self._resolving: asyncio.Task[None] | None = None
        self._transmission = False
        self._closed = False
        self._drain_close = False
        self._rx = Receiver()
        self._replies: list[bytes | bytearray | memoryview] = []
        self._flush_scheduled = False
        self._read_paused = False
        self._write_paused = False
        self._loop = asyncio.get_running_loop()
        self._handed_over = False  # the native relay owns the client's socket

    # ---- asyncio callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._standing.admit(transport):
            return
        self.peer = self._standing.peer
        nodelay(transport)
        self.agent.connections.add(self)
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx.buffer(self.conn.payload_buffer() if self._transmission else None)

    def buffer_updated(self, nbytes: int) -> None:
        if self._handed_over:
            return
        data = self._rx.received(nbytes)
        if data is None:
            self.conn.payload_received(nbytes)
            self._pump()
        elif self._transmission:
            self.conn.receive_data(data)
            self._pump()
        else:
            self._neg += data
            self._negotiate()
            if self._resolving is not None and len(self._neg) > MAX_NEGOTIATION_BACKLOG \
                    and self.transport is not None and not self._read_paused:
                # A client pipelining options while one is being resolved: stop reading.
                self._read_paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._handed_over:
            return False
        if self._transmission or not self._resolving:
            self.conn.receive_data(b"")
            self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:
            return  # only our descriptor closed; the relay has the connection
        self._closed = True
        self._standing.release()
        self.agent.connections.discard(self)
        if self._resolving is not None:
            self._resolving.cancel()
        for s in self.candidates.values():
            s.close()
        self.candidates.clear()
        if self.session is not None:
            self.agent.unregister(self.session)
            self.session.close()

    def shutdown(self) -> None:
        """The agent stops: answer what can be answered, close the connection and every
        session it holds (without waiting for the client to read or hang up)."""
        if self._resolving is not None:
            self._resolving.cancel()
        for s in self.candidates.values():
            s.close()
        self.candidates.clear()
        if self.session is not None:
            self.session.shutdown("the host agent is shutting down")
        if self.transport is not None and not self._handed_over:
            self.flush_replies()
            self.transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # ---- negotiation ----------------------------------------------------

    def _feed(self, n: int) -> None:
        chunk = bytes(self._neg[:n])
        del self._neg[:n]
        self.conn.receive_data(chunk)
        self._pump()

    def _negotiate(self) -> None:
        """Feed complete options to the state machine, resolving named exports first."""
        buf = self._neg
        while not self._closed and not self._transmission and self._resolving is None \
                and not self._tls_pending:
            if self._skip:
                n = min(self._skip, len(buf))
                if not n:
                    return
                self._skip -= n
                self._feed(n)
                continue
            if not self._flags_fed:
                if len(buf) < 4:
                    return
                self._flags_fed = True
                self._feed(4)
                continue
            if len(buf) < _OPT_HDR.size:
                return
            magic, opt, length = _OPT_HDR.unpack_from(buf)
            if magic != IHAVEOPT:
                self._feed(len(buf))  # the state machine hangs up on it
                return
            if length > MAX_OPTION_DATA:  # skipped unread by the state machine
                n = min(len(buf), _OPT_HDR.size + length)
                self._skip = _OPT_HDR.size + length - n
                self._feed(n)
                continue
            if len(buf) < _OPT_HDR.size + length:
                return
            data = bytes(buf[_OPT_HDR.size:_OPT_HDR.size + length])
            if not self._prepared(opt, data):
                return
            self._feed(_OPT_HDR.size + length)
        if self._transmission and buf and not self._closed and not self._handed_over:
            self._feed(len(buf))

    def _prepared(self, opt: int, data: bytes) -> bool:
        """True if the state machine can answer `opt` now; else start resolving for it."""
        if opt == Opt.LIST:
            if self._listed:
                return True
            self._start(self._resolve_list())
            return False
        name = _option_name(opt, data)
        if name is None:
            return True
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if name in self.exports.resolved:
                return True
            self._start(self._resolve(name, connect=False))
            return False
        if name in self._go_done:
            return True
        self._start(self._resolve(name, connect=True))
        return False

    def _start(self, coro: Any) -> None:
        self._resolving = asyncio.get_running_loop().create_task(coro)

    async def _resolve_list(self) -> None:
        try:
            self.exports.listed = await self.agent.list_exports()
        finally:
            self._listed = True
            self._resolved()

    async def _resolve(self, name: str, *, connect: bool) -> None:
        try:
            info, session = await self.agent.resolve(name, connect=connect, peer=self.peer)
            if session is not None:
                if self._closed:
                    session.close()
                else:
                    old = self.candidates.pop(name, None)
                    if old is not None:
                        old.close()
                    while len(self.candidates) >= MAX_CANDIDATES:
                        oldest = next(iter(self.candidates))
                        self.candidates.pop(oldest).close()
                        self._go_done.discard(oldest)
                    self.candidates[name] = session
            self.exports.resolved[name] = info
        except Exception as e:
            log.exception("export resolution failed", extra={"export": name})
            self.exports.resolved[name] = ExportInfo(
                name, 0, blocked=f"host agent could not resolve export {name!r}: {e}")
        finally:
            if connect:
                self._go_done.add(name)
            self._resolved()

    def _resolved(self) -> None:
        self._resolving = None
        if not self._closed:
            if self._read_paused and not self._transmission and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            self._negotiate()
            if not self._transmission and self.conn.phase is Phase.CLOSED:
                self._close_transport()

    def _ready(self, ev: Ready) -> None:
        self._transmission = True
        self._standing.negotiated()
        session = self.candidates.pop(ev.export.name, None)
        for other in self.candidates.values():
            other.close()
        self.candidates.clear()
        if session is None:  # pragma: no cover - GO/EXPORT_NAME are always resolved first
            log.error("no session for a negotiated export", extra={"export": ev.export.name})
            if self.transport is not None:
                self.transport.abort()
            return
        self.session = session
        session.responder = self
        self.agent.register(session)
        log.info("client connected", extra={"peer": self.peer, "export": ev.export.name,
                                            "structured": ev.structured,
                                            "usable": [p.node for p in session.up],
                                            "data_path": "native" if isinstance(
                                                session, RelaySession) else "python"})
        if isinstance(session, RelaySession):
            self._hand_over(session, ev)

    def _hand_over(self, session: RelaySession, ev: Ready) -> None:
        """Give the client's socket to the native relay for the transmission phase.

        Bytes the client pipelined after NBD_OPT_GO and the GO reply itself (not sent
        yet) go with it. The transport is then closed without ending the connection:
        the relay holds a duplicate of its descriptor."""
        transport = self.transport
        assert transport is not None
        if transport.get_write_buffer_size():
            # Earlier negotiation replies are still queued: hand over once they are out.
            transport.pause_reading()
            self._loop.call_later(0.005, self._hand_over, session, ev)
            return
        if self._closed or session.closed:
            return
        sock = transport.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        pending_in = bytes(self._neg)
        self._neg.clear()
        pending_out = b"".join(bytes(r) for r in self._replies)
        self._replies.clear()
        self._handed_over = True
        transport.pause_reading()
        transport.abort()
        session.on_client_closed = self._relay_closed
        session.attach_client(fd, structured=ev.structured, meta_context=ev.meta_context,
                              read_only=ev.export.read_only, pending_in=pending_in,
                              pending_out=pending_out)

    def _relay_closed(self, reason: str, error: bool) -> None:
        """The relay's client connection ended (the session is closed already)."""
        self._closed = True
        self._standing.release()
        self.agent.connections.discard(self)
        if self.session is not None:
            self.agent.unregister(self.session)
        log.info("client disconnected", extra={"peer": self.peer, "reason": reason, "error": error})

    # ---- transmission ---------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        replies = self._replies
        session = self.session
        next_event = conn.next_event
        while not self._closed:
            ev = next_event()
            if conn.out:
                replies.append(conn.data_to_send())
            if ev is NEED_DATA:
                break
            if type(ev) is Request:
                if session is None:  # pragma: no cover
                    break
                data = ev.data
                if data is not None:
                    data = self._own(data)
                session.submit(ev.command, ev.flags, ev.cookie, ev.offset, ev.length, data)
            elif type(ev) is Ready:
                self._ready(ev)
                session = self.session
            elif type(ev) is Disconnect:
                self._disconnect(ev)
                break
            elif type(ev) is StartTls:
                self.flush_replies()
                self._tls_pending = True
                self.transport.pause_reading()  # type: ignore[union-attr]  # for start_tls
                self._loop.create_task(self._upgrade())
                break
        if session is not None:
            session.flush_paths()
            self._update_reading()
        self.flush_replies()

    async def _upgrade(self) -> None:
        raw = self.transport
        assert raw is not None
        try:
            tls = await self.guard.upgrade(raw, self)
        except (OSError, TimeoutError, ConnectionError, RuntimeError) as e:
            log.warning("nbd TLS handshake failed, connection dropped",
                        extra={"peer": self.peer, "reason": describe_tls_error(e)})
            raw.abort()
            self.connection_lost(e)
            return
        if tls is None or self._closed:
            return
        self.transport = tls
        self._tls_pending = False
        self.conn.tls_started()
        self._negotiate()

    def _own(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """A write payload the session may keep (for a retry on another path)."""
        return self.conn.own_payload(data)

    def _disconnect(self, ev: Disconnect) -> None:
        self.flush_replies()
        if ev.error:
            log.warning("client protocol error, hard disconnect",
                        extra={"peer": self.peer, "reason": ev.reason})
            if self.transport is not None:
                self.transport.abort()
            return
        if self.session is not None and self.session.outstanding:
            self._drain_close = True  # answer what is in flight, then close
            return
        self._close_transport()

    def _close_transport(self) -> None:
        self.flush_replies()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def reply(self, op: Op, res: Completed) -> None:
        conn = self.conn
        replies = self._replies
        cmd = op.cmd
        if res.error:
            replies.extend(conn.reply_error(op.cookie, res.error, res.message))
        elif cmd == _READ:
            data = res.data
            if data is None:
                replies.append(conn.reply_read_hole(op.cookie, op.offset, op.length))
            else:
                replies.extend(conn.reply_read(op.cookie, op.offset, data))
        elif cmd == _BLOCK_STATUS:
            extents = res.extents or [(op.length, 0)]
            replies.append(conn.reply_block_status(op.cookie, extents))
        else:
            replies.append(conn.reply_ok(op.cookie))
        # Replies go out once per loop iteration: the replies of every path that
        # answered in this iteration leave in one system call.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush_replies)
        if self._read_paused or self._drain_close:
            self._replied()

    def reply_error(self, op: Op, err: int, message: str) -> None:
        self._replies.extend(self.conn.reply_error(op.cookie, err, message))
        self._replied()

    def _replied(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush_replies)
        if self._read_paused:
            self._update_reading()
        if self._drain_close and self.session is not None and not self.session.outstanding:
            self._close_transport()

    def flush_replies(self) -> None:
        self._flush_scheduled = False
        replies = self._replies
        if not replies:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(replies) == 1:
                transport.write(replies[0])
            else:
                transport.writelines(replies)
        replies.clear()

    def _update_reading(self) -> None:
        transport = self.transport
        session = self.session
        if transport is None or transport.is_closing() or session is None:
            return
        pause = self._write_paused or session.outstanding >= MAX_OUTSTANDING
        if pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()
