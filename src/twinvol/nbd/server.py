"""Sans-IO NBD server connection: bytes in, events and bytes out.

No sockets, no clock, no disk. The I/O layer feeds received bytes with
`receive_data`, pulls `Event`s with `next_event` until `NEED_DATA`, sends
`data_to_send()` and answers each `Request` with one of the `reply_*` builders.

Everything the spec lets a server decide on its own (option replies, flag and
range validation, oversize handling) is decided here, so it can be tested byte
by byte: this module frames options and runs transmission, the answers to the
options are `nbd/server_options.py`, and the events and the export interface
`nbd/server_events.py`. Buffers are bounded: option data over `MAX_OPTION_DATA` is skipped
without being stored, and a write payload over `MAX_PAYLOAD` is a hard
disconnect (the spec's denial-of-service allowance).

Zero-copy receive: `receive_data` accepts any bytes-like object (e.g. a view of
the I/O layer's reusable scratch buffer); whatever the machine still needs when
`next_event` returns `NEED_DATA` it has copied, so the caller may then reuse
its buffer. While a write payload is arriving, `payload_buffer()` offers the
destination itself so the socket can `recv_into` it (`payload_received(n)`).
A `Request.data` view is valid until the next `next_event` call.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from twinvol.nbd.constants import (
    CHUNK_HEADER,
    ERROR_PAYLOAD,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    NBDMAGIC,
    NEED_DATA,
    OPTION_HEADER,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    NeedData,
    Opt,
    Reply,
)
from twinvol.nbd.server_events import (
    Disconnect,
    Event,
    ExportInfo,
    ExportProvider,
    Ready,
    Request,
    StartTls,
    TlsMode,
)
from twinvol.nbd.server_options import META_CONTEXT_ID, Negotiation, utf8_bounded
from twinvol.storage.buffers import POOL

_CHUNK_OFFSET = struct.Struct(">IHHQIQ")

REQUEST_SIZE = REQUEST_HEADER.size  # 28

FUA = int(CmdFlag.FUA)
DF = int(CmdFlag.DF)
NO_HOLE = int(CmdFlag.NO_HOLE)
REQ_ONE = int(CmdFlag.REQ_ONE)
FAST_ZERO = int(CmdFlag.FAST_ZERO)

# Which command flags each command accepts (FUA is valid on every command).
_ALLOWED_FLAGS = {
    Cmd.READ: FUA | DF,
    Cmd.WRITE: FUA,
    Cmd.DISC: FUA,
    Cmd.FLUSH: FUA,
    Cmd.TRIM: FUA,
    Cmd.CACHE: FUA,
    Cmd.WRITE_ZEROES: FUA | NO_HOLE | FAST_ZERO,
    Cmd.BLOCK_STATUS: FUA | REQ_ONE,
}
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_KNOWN_CMDS = frozenset(int(c) for c in Cmd)


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class _Payload:
    """A write whose payload is still arriving (or being discarded)."""

    flags: int
    cookie: int
    offset: int
    length: int
    buf: bytearray | None
    got: int = 0
    error: tuple[int, str] | None = None  # reply with this error once consumed


class ServerConnection:
    """One NBD connection, server side, as a pure state machine."""

    def __init__(self, exports: ExportProvider, *, max_payload: int = MAX_PAYLOAD,
                 tls: TlsMode = TlsMode.OFF, max_options: int = MAX_OPTIONS) -> None:
        self.exports = exports
        self.max_options = max_options
        self.options_seen = 0
        self.max_payload = max_payload
        self.phase = Phase.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self.tx_flags = 0
        self.structured = False
        self.meta_context = False
        self._data: bytes | memoryview = b""
        self._pos = 0
        # bytes waiting to be sent: an adapter checks it, `data_to_send` takes them
        self.out: list[bytes] = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                             FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]
        self._options = Negotiation(exports, max_payload, self.out, tls)
        self._tls_wait = False  # STARTTLS acknowledged, handshake not yet done
        self._payload: _Payload | None = None
        self._spare: bytearray | None = None
        self._skip = 0  # option bytes still to discard
        self._skip_opt = 0
        self._events: list[Event] = []

    # ---- byte plumbing -------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the client. An empty `data` means EOF."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            if self.phase is Phase.TRANSMISSION and self._payload is not None:
                self._close("client disconnected in the middle of a write payload", error=True)
            else:
                self._close("client closed the connection", error=False)
            return
        if self._pos >= len(self._data):
            self._data = data if isinstance(data, bytes | memoryview) else memoryview(data)
        else:
            self._data = bytes(self._data[self._pos:]) + bytes(data)
        self._pos = 0

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current write payload can be received directly, if anywhere."""
        p = self._payload
        if p is None or p.buf is None or self._pos < len(self._data):
            return None
        return memoryview(p.buf)[p.got:p.length]

    def payload_received(self, n: int) -> None:
        """`n` bytes were written into the view `payload_buffer()` returned."""
        p = self._payload
        assert p is not None and p.got + n <= p.length
        p.got += n

    def _stash(self) -> None:
        """Keep only what is unparsed, as our own bytes, so the caller can reuse its buffer."""
        if self._pos >= len(self._data):
            self._data = b""
            self._pos = 0
        elif not isinstance(self._data, bytes):
            self._data = bytes(self._data[self._pos:])
            self._pos = 0

    def data_to_send(self) -> bytes:
        """Bytes produced by the state machine itself (handshake and error replies)."""
        if not self.out:
            return b""
        out = b"".join(self.out)
        self.out.clear()
        return out

    @property
    def tls_active(self) -> bool:
        return self._options.tls_active

    def tls_started(self) -> None:
        """The I/O layer finished the TLS handshake that `StartTls` asked for: option
        haggling starts again, over TLS, from a clean slate."""
        assert self._tls_wait
        self._tls_wait = False
        self._options.tls_started()

    def _avail(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        b = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return b

    def _close(self, reason: str, *, error: bool) -> None:
        self.phase = Phase.CLOSED
        self._data = b""
        self._pos = 0
        self._events.append(Disconnect(reason, error))

    # ---- events ---------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """Return the next event, or `NEED_DATA` when more bytes are needed."""
        while True:
            if self._events:
                return self._events.pop(0)
            phase = self.phase
            if phase is Phase.TRANSMISSION:
                ev = self._next_request()
            elif phase is Phase.OPTIONS:
                ev = self._next_option()
            elif phase is Phase.CLIENT_FLAGS:
                ev = self._client_flags()
            else:
                self._stash()
                return NEED_DATA
            if ev is NEED_DATA:
                if self._events:
                    continue
                self._stash()
                return NEED_DATA
            if ev is not None:
                return ev

    def _client_flags(self) -> Event | NeedData | None:
        if self._avail() < 4:
            return NEED_DATA
        (flags,) = struct.unpack(">I", self._take(4))
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            self._close(f"client sent unknown handshake flags {flags:#x}", error=True)
            return None
        self._options.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return None

    # ---- options (framing here; answers in nbd/server_options.py) ------------

    def _next_option(self) -> Event | NeedData | None:
        if self._tls_wait:
            if self._avail():
                self._close("client sent data after NBD_OPT_STARTTLS before the TLS "
                            "handshake", error=True)
                return None
            return NEED_DATA
        if self._skip:
            n = min(self._skip, self._avail())
            self._pos += n
            self._skip -= n
            if self._skip:
                return NEED_DATA
            bye = self._options.oversized(self._skip_opt)
            if bye is not None:
                self._close(bye.reason, error=bye.error)
            return None
        if self._avail() < OPTION_HEADER.size:
            return NEED_DATA
        magic, opt, length = OPTION_HEADER.unpack_from(self._data, self._pos)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}", error=True)
            return None
        self.options_seen += 1
        if self.options_seen > self.max_options:
            self._close(f"more than {self.max_options} options in one negotiation", error=True)
            return None
        if length > MAX_OPTION_DATA:
            self._pos += OPTION_HEADER.size
            if opt == Opt.EXPORT_NAME:
                self._close("NBD_OPT_EXPORT_NAME with an oversized name", error=True)
                return None
            self._skip = length
            self._skip_opt = opt
            return None
        if self._avail() < OPTION_HEADER.size + length:
            return NEED_DATA
        self._pos += OPTION_HEADER.size
        data = self._take(length)
        ev = self._options.handle(opt, data)
        if type(ev) is Disconnect:
            self._close(ev.reason, error=ev.error)
            return None
        if type(ev) is Ready:
            self._enter_transmission(ev)
        elif type(ev) is StartTls:
            self._tls_wait = True
            if self._avail():
                self._close("client sent data after NBD_OPT_STARTTLS before the TLS "
                            "handshake", error=True)
                return None
        return ev

    def _enter_transmission(self, ready: Ready) -> None:
        self.phase = Phase.TRANSMISSION
        self.export = ready.export
        self.tx_flags = ready.flags
        self.structured = ready.structured
        self.meta_context = ready.meta_context

    # ---- transmission ---------------------------------------------------

    def _next_request(self) -> Event | NeedData | None:
        p = self._payload
        if p is not None:
            return self._continue_payload(p)
        if len(self._data) - self._pos < REQUEST_SIZE:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = REQUEST_HEADER.unpack_from(self._data,
                                                                               self._pos)
        self._pos += REQUEST_SIZE
        if magic != REQUEST_MAGIC:
            self._close(f"bad request magic {magic:#x}", error=True)
            return None
        if cmd == Cmd.WRITE:
            if length > self.max_payload:
                self._close(f"write payload of {length} bytes exceeds the {self.max_payload} "
                            "byte maximum", error=True)
                return None
            err = self._check(Cmd.WRITE, flags, offset, length)
            end = self._pos + length
            if err is None and end <= len(self._data):
                # Whole payload already here: hand out a view, no copy.
                data = self._data
                view = (data if type(data) is memoryview else memoryview(data))[self._pos:end]
                self._pos = end
                return Request(Cmd.WRITE, flags, cookie, offset, length, view)
            p = _Payload(flags, cookie, offset, length, None, 0, err)
            if err is None:
                p.buf = self._payload_storage(length)
            self._payload = p
            return self._continue_payload(p)
        if cmd not in _KNOWN_CMDS:
            self._reply_error_now(cookie, Err.EINVAL, f"unknown command {cmd}")
            return None
        command = Cmd(cmd)
        err = self._check(command, flags, offset, length)
        if err is not None:
            self._reply_error_now(cookie, err[0], err[1])
            return None
        if command == Cmd.DISC:
            self.phase = Phase.CLOSED
            self._data = b""
            self._pos = 0
            return Disconnect("client sent NBD_CMD_DISC")
        return Request(command, flags, cookie, offset, length, None)

    def _continue_payload(self, p: _Payload) -> Event | NeedData | None:
        n = min(p.length - p.got, len(self._data) - self._pos)
        if p.buf is not None and n:
            p.buf[p.got:p.got + n] = memoryview(self._data)[self._pos:self._pos + n]
        p.got += n
        self._pos += n
        if p.got < p.length:
            return NEED_DATA
        self._payload = None
        if p.error is not None:
            self._reply_error_now(p.cookie, p.error[0], p.error[1])
            return None
        assert p.buf is not None
        return Request(Cmd.WRITE, p.flags, p.cookie, p.offset, p.length,
                       memoryview(p.buf)[:p.length])

    def own_payload(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """Take ownership of a Request's payload, to keep it past the next event.

        A payload received into the connection's payload buffer is handed over whole
        (the connection allocates another for the next large write): no copy. A small
        one is a view of the caller's receive buffer, which is reused: it is copied.
        """
        spare = self._spare
        if spare is not None and isinstance(data, memoryview) and data.obj is spare:
            self._spare = None
            return data
        return bytes(data)

    def _payload_storage(self, length: int) -> bytearray:
        """A payload buffer, reused across writes while the connection keeps it; one
        handed over comes back through the process's buffer pool once released."""
        spare = self._spare
        if spare is None or len(spare) < length:
            spare = self._spare = POOL.get(length)
        return spare

    def _check(self, cmd: Cmd, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Validate a request against negotiated state; return (errno, message) or None."""
        exp = self.export
        assert exp is not None
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return Err.EINVAL, f"flags {flags:#x} are not valid for {cmd.name}"
        if flags & DF and not self.structured:
            return Err.EINVAL, "DF flag needs structured replies"
        if cmd == Cmd.DISC or cmd == Cmd.FLUSH:
            return None
        if cmd in _WRITES and exp.read_only:
            return Err.EPERM, "export is read-only"
        if cmd == Cmd.READ and length > self.max_payload:
            # Structured clients may retry smaller on EOVERFLOW; simple ones broke a MUST.
            if self.structured:
                return Err.EOVERFLOW, f"read of {length} bytes is over the {self.max_payload} " \
                                      "byte maximum; split it"
            return Err.EINVAL, f"read of {length} bytes exceeds the maximum payload"
        if cmd == Cmd.BLOCK_STATUS:
            if not self.meta_context:
                return Err.EINVAL, "no metadata context was negotiated"
            if length == 0:
                return Err.EINVAL, "block status length must not be zero"
        if offset + length > exp.size:
            err = Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
            return err, f"request [{offset}, +{length}) is past the end of the export ({exp.size})"
        return None

    def _reply_error_now(self, cookie: int, err: int, message: str) -> None:
        self.out.append(b"".join(self.reply_error(cookie, err, message)))

    # ---- reply builders (for the I/O layer) ------------------------------

    def reply_ok(self, cookie: int) -> bytes:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_read(self, cookie: int, offset: int,
                   data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        if self.structured:
            if not data:  # a chunk must describe at least one byte: zero-length reads get NONE
                return [CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.NONE,
                                          cookie, 0)]
            hdr = _CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.OFFSET_DATA,
                                     cookie, 8 + len(data), offset)
        else:
            hdr = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        return [hdr, data]

    def reply_read_hole(self, cookie: int, offset: int, length: int) -> bytes:
        """Reply to a read of a range known to be all zeroes (no data sent if structured)."""
        if self.structured:
            return _CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.OFFSET_HOLE,
                                      cookie, 12, offset) + struct.pack(">I", length)
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(length)

    def reply_error(self, cookie: int, err: int, message: str = "") -> list[bytes]:
        if self.structured:
            msg = utf8_bounded(message)
            return [CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.ERROR, cookie,
                                6 + len(msg)) + ERROR_PAYLOAD.pack(err, len(msg)) + msg]
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie)]

    def reply_block_status(self, cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
        """`extents` is a non-empty list of (length, status flags) from the request offset."""
        body = b"".join(struct.pack(">II", n, f) for n, f in extents)
        return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.BLOCK_STATUS,
                                 cookie, 4 + len(body)) + struct.pack(">I", META_CONTEXT_ID) + body
