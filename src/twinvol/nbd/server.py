"""Sans-IO NBD server connection: bytes in, events and bytes out.

No sockets, no clock, no disk. The I/O layer feeds received bytes with
`receive_data`, pulls `Event`s with `next_event` until `NEED_DATA`, sends
`data_to_send()` and answers each `Request` with one of the `reply_*` builders.

Everything the spec lets a server decide on its own (option replies, flag and
range validation, oversize handling) is decided here, so it can be tested byte
by byte. Buffers are bounded: option data over `MAX_OPTION_DATA` is skipped
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

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from twinvol.nbd.constants import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    ERROR_PAYLOAD,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK,
    NBDMAGIC,
    NEED_DATA,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    Info,
    NeedData,
    Opt,
    Rep,
    Reply,
    TxFlag,
)
from twinvol.storage.buffers import POOL

_CHUNK_OFFSET = struct.Struct(">IHHQIQ")

REQUEST_SIZE = REQUEST_HEADER.size  # 28
META_CONTEXT_ID = 1  # id of base:allocation once selected

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


@dataclass(slots=True)
class ExportInfo:
    """What the server knows about one export while negotiating."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    # Set while this copy must not serve hosts (a stale side of a pair): negotiation
    # is refused with NBD_REP_ERR_POLICY and this text.
    blocked: str | None = None
    # The I/O gate: replies leave only while the monotonic clock is below this (a
    # mirrored copy serves under a lease; see replication/core/lease.py). Checked when
    # replies are sent, so a request queued before a pause is never answered late.
    serve_until: float = math.inf


class ExportProvider(Protocol):
    """Answers export questions during the handshake (pure lookups, no I/O)."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def list_exports(self) -> Sequence[ExportInfo]: ...


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class Ready:
    """Negotiation finished: transmission starts on `export`."""

    export: ExportInfo
    structured: bool
    meta_context: bool
    flags: int


@dataclass(slots=True)
class Request:
    """A valid transmission request the I/O layer must perform and answer.

    `data` is the write payload: a view valid until the next `next_event` call
    (copy it to keep it longer).
    """

    command: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None


@dataclass(slots=True)
class Disconnect:
    """The connection ends. `error` is set for a hard disconnect on a protocol violation."""

    reason: str
    error: bool = False


Event = Ready | Request | Disconnect


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


@dataclass(slots=True)
class _Negotiated:
    structured: bool = False
    meta_export: str | None = None  # export named by the last successful SET_META_CONTEXT
    meta_selected: bool = False
    no_zeroes: bool = False
    extra: dict[str, int] = field(default_factory=dict)


class ServerConnection:
    """One NBD connection, server side, as a pure state machine."""

    def __init__(self, exports: ExportProvider, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.exports = exports
        self.max_payload = max_payload
        self.phase = Phase.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self.tx_flags = 0
        self.structured = False
        self.meta_context = False
        self._neg = _Negotiated()
        self._data: bytes | memoryview = b""
        self._pos = 0
        self._out: list[bytes] = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                              FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]
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
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

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
        self._neg.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return None

    # ---- option haggling ------------------------------------------------

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data)

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._reply(opt, rep, _utf8(message))

    def _next_option(self) -> Event | NeedData | None:
        if self._skip:
            n = min(self._skip, self._avail())
            self._pos += n
            self._skip -= n
            if self._skip:
                return NEED_DATA
            if self._skip_opt == Opt.ABORT:  # data with ABORT is ignored, never refused
                self._reply(Opt.ABORT, Rep.ACK)
                self._close("client aborted negotiation", error=False)
                return None
            if self._skip_opt == Opt.SET_META_CONTEXT:  # a failed SET still clears the selection
                self._neg.meta_selected = False
                self._neg.meta_export = None
            self._error(self._skip_opt, Rep.ERR_TOO_BIG,
                        f"option data larger than {MAX_OPTION_DATA} bytes")
            return None
        if self._avail() < OPTION_HEADER.size:
            return NEED_DATA
        magic, opt, length = OPTION_HEADER.unpack_from(self._data, self._pos)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}", error=True)
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
        return self._handle_option(opt, data)

    def _handle_option(self, opt: int, data: bytes) -> Event | None:
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self._close("client aborted negotiation", error=False)
            return None
        if opt == Opt.LIST:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for exp in self.exports.list_exports():
                name = exp.name.encode()
                self._reply(opt, Rep.SERVER,
                            struct.pack(">I", len(name)) + name + exp.description.encode())
            self._reply(opt, Rep.ACK)
            return None
        if opt == Opt.STARTTLS:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            else:
                self._error(opt, Rep.ERR_UNSUP, "TLS is not supported by this server")
            return None
        if opt in (Opt.INFO, Opt.GO):
            return self._opt_info_go(opt, data)
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self._neg.structured:
                self._error(opt, Rep.ERR_INVALID, "structured replies already negotiated")
            else:
                self._neg.structured = True
                self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
            return None
        self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")
        return None

    def _flags_for(self, exp: ExportInfo) -> int:
        f = (TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN
             | TxFlag.SEND_CACHE)
        if exp.read_only:
            f |= TxFlag.READ_ONLY
        else:
            f |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        if self._neg.structured:
            f |= TxFlag.SEND_DF
        return int(f)

    def _enter_transmission(self, exp: ExportInfo) -> Ready:
        self.phase = Phase.TRANSMISSION
        self.export = exp
        self.tx_flags = self._flags_for(exp)
        self.structured = self._neg.structured
        self.meta_context = (self._neg.meta_selected and self._neg.meta_export == exp.name)
        return Ready(exp, self.structured, self.meta_context, self.tx_flags)

    def _opt_export_name(self, data: bytes) -> Event | None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            self._close("export name is not valid UTF-8", error=True)
            return None
        exp = self.exports.lookup(name)
        if exp is None or exp.blocked:
            # The spec allows no error reply here: the only answer is to hang up.
            why = "unknown" if exp is None else "blocked"
            self._close(f"{why} export {name!r} requested with NBD_OPT_EXPORT_NAME", error=True)
            return None
        ready = self._enter_transmission(exp)
        tail = b"" if self._neg.no_zeroes else bytes(124)
        self._out.append(struct.pack(">QH", exp.size, self.tx_flags) + tail)
        return ready

    @staticmethod
    def _parse_name(data: bytes) -> tuple[str, int]:
        """Parse a length-prefixed name at the start; returns (name, next offset)."""
        if len(data) < 4:
            raise ValueError("option data too short for a name length")
        (n,) = struct.unpack_from(">I", data)
        if n > len(data) - 4:
            raise ValueError("name length runs past the option data")
        if n > MAX_STRING:
            raise ValueError(f"name longer than {MAX_STRING} bytes")
        return data[4:4 + n].decode(), 4 + n

    def _opt_info_go(self, opt: int, data: bytes) -> Event | None:
        try:
            name, pos = self._parse_name(data)
            if len(data) - pos < 2:
                raise ValueError("missing the number of information requests")
            (count,) = struct.unpack_from(">H", data, pos)
            pos += 2
            if len(data) - pos != 2 * count:
                raise ValueError("information request list does not match the option length")
            requests = set(struct.unpack_from(f">{count}H", data, pos))
        except (ValueError, UnicodeDecodeError) as e:
            self._error(opt, Rep.ERR_INVALID, str(e))
            return None
        exp = self.exports.lookup(name)
        if exp is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"export {name!r} does not exist on this node")
            return None
        if exp.blocked:
            self._error(opt, Rep.ERR_POLICY, exp.blocked)
            return None
        flags = self._flags_for(exp)
        self._reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, exp.size, flags))
        if Info.NAME in requests:
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + exp.name.encode())
        if Info.DESCRIPTION in requests and exp.description:
            self._reply(opt, Rep.INFO,
                        struct.pack(">H", Info.DESCRIPTION) + exp.description.encode())
        # Block size is sent even unrequested: min 1 imposes nothing on the client.
        self._reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, MIN_BLOCK,
                                               min(PREFERRED_BLOCK, self.max_payload),
                                               self.max_payload))
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            return self._enter_transmission(exp)
        return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            # A SET replaces the previous selection even when it fails.
            self._neg.meta_selected = False
            self._neg.meta_export = None
        if not self._neg.structured:
            self._error(opt, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            name, pos = self._parse_name(data)
            if len(data) - pos < 4:
                raise ValueError("missing the number of queries")
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(count):
                if len(data) - pos < 4:
                    raise ValueError("query length runs past the option data")
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError("query runs past the option data")
                queries.append(data[pos:pos + qlen].decode())
                pos += qlen
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except (ValueError, UnicodeDecodeError) as e:
            self._error(opt, Rep.ERR_INVALID, str(e))
            return
        for q in queries:
            if ":" not in q:
                self._error(opt, Rep.ERR_INVALID, f"query {q!r} has no namespace")
                return
        exp = self.exports.lookup(name)
        if exp is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"export {name!r} does not exist on this node")
            return
        if setting:
            match = BASE_ALLOCATION in queries
        else:
            match = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        if match:
            ctx_id = META_CONTEXT_ID if setting else 0
            self._reply(opt, Rep.META_CONTEXT,
                        struct.pack(">I", ctx_id) + BASE_ALLOCATION.encode())
        if setting and match:
            self._neg.meta_selected = True
            self._neg.meta_export = name
        self._reply(opt, Rep.ACK)

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
        self._out.append(b"".join(self.reply_error(cookie, err, message)))

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
            msg = _utf8(message)
            return [CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.ERROR, cookie,
                                6 + len(msg)) + ERROR_PAYLOAD.pack(err, len(msg)) + msg]
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie)]

    def reply_block_status(self, cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
        """`extents` is a non-empty list of (length, status flags) from the request offset."""
        body = b"".join(struct.pack(">II", n, f) for n, f in extents)
        return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.BLOCK_STATUS,
                                 cookie, 4 + len(body)) + struct.pack(">I", META_CONTEXT_ID) + body


def _utf8(message: str) -> bytes:
    """Encode a message, cut to the spec's string limit on a character boundary."""
    raw = message.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()
