"""A tiny in-memory NBD client for driving the sans-IO server state machine byte by byte.

Encoders build what a client sends; parsers decode what the server sends, strictly,
so a malformed reply fails the test instead of being skipped over.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twinvol.nbd.constants import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REP_ERR,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    Reply,
)
from twinvol.nbd.server import NEED_DATA, ServerConnection
from twinvol.nbd.server_events import Disconnect, ExportInfo, Ready, Request, StartTls

Event = Ready | Request | Disconnect

# ---- the export provider ------------------------------------------------


class Exports:
    """An in-memory `ExportProvider`."""

    def __init__(self, *exports: ExportInfo) -> None:
        self.by_name = {e.name: e for e in exports}
        self.lookups: list[str] = []

    def lookup(self, name: str) -> ExportInfo | None:
        self.lookups.append(name)
        return self.by_name.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return list(self.by_name.values())


# ---- encoders -----------------------------------------------------------

BOTH_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES


def client_flags(flags: int = BOTH_CLIENT_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None,
           magic: int = IHAVEOPT) -> bytes:
    """One option: header (length defaults to len(data)) followed by `data`."""
    n = len(data) if length is None else length
    return struct.pack(">QII", magic, opt, n) + data


def _b(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


def name_field(name: str | bytes) -> bytes:
    n = _b(name)
    return struct.pack(">I", len(n)) + n


def info_data(name: str | bytes, *infos: int) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    return name_field(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str | bytes, *queries: str | bytes) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    body = b"".join(name_field(q) for q in queries)
    return name_field(name) + struct.pack(">I", len(queries)) + body


def request(cmd: int, *, flags: int = 0, cookie: int = 0, offset: int = 0,
            length: int | None = None, payload: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    """A request header (length defaults to len(payload)) followed by `payload`."""
    n = len(payload) if length is None else length
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, n) + payload


# ---- option reply parsing ----------------------------------------------


@dataclass(frozen=True)
class OptReply:
    opt: int
    rep: int
    data: bytes

    @property
    def final(self) -> bool:
        return self.rep == Rep.ACK or bool(self.rep & REP_ERR)

    @property
    def is_error(self) -> bool:
        return bool(self.rep & REP_ERR)

    def info(self) -> tuple[int, bytes]:
        """(information type, payload) of an NBD_REP_INFO reply."""
        assert self.rep == Rep.INFO, self
        assert len(self.data) >= 2, self
        (typ,) = struct.unpack_from(">H", self.data)
        return typ, self.data[2:]

    def meta_context(self) -> tuple[int, str]:
        assert self.rep == Rep.META_CONTEXT, self
        assert len(self.data) >= 4, self
        (ctx_id,) = struct.unpack_from(">I", self.data)
        return ctx_id, self.data[4:].decode()

    def server(self) -> tuple[str, str]:
        """(name, description) of an NBD_REP_SERVER reply."""
        assert self.rep == Rep.SERVER, self
        (n,) = struct.unpack_from(">I", self.data)
        assert n <= len(self.data) - 4, self
        return self.data[4:4 + n].decode(), self.data[4 + n:].decode()


def parse_option_replies(buf: bytes) -> tuple[list[OptReply], bytes]:
    """Decode complete option replies; returns them and the undecoded remainder."""
    out: list[OptReply] = []
    pos = 0
    while len(buf) - pos >= 20:
        magic, opt, rep, length = struct.unpack_from(">QIII", buf, pos)
        if magic != OPTION_REPLY_MAGIC:
            raise ValueError(f"bad option reply magic {magic:#x} at {pos}")
        if len(buf) - pos - 20 < length:
            break
        out.append(OptReply(opt, rep, bytes(buf[pos + 20:pos + 20 + length])))
        pos += 20 + length
    return out, bytes(buf[pos:])


def leading_option_replies(buf: bytes) -> tuple[list[OptReply], bytes]:
    """Complete option replies at the start of `buf`, and whatever follows them."""
    out: list[OptReply] = []
    pos = 0
    while len(buf) - pos >= 20:
        magic, opt, rep, length = struct.unpack_from(">QIII", buf, pos)
        if magic != OPTION_REPLY_MAGIC or len(buf) - pos - 20 < length:
            break
        out.append(OptReply(opt, rep, bytes(buf[pos + 20:pos + 20 + length])))
        pos += 20 + length
    return out, bytes(buf[pos:])


def option_replies(buf: bytes) -> list[OptReply]:
    """Decode option replies that must make up all of `buf` exactly."""
    replies, rest = parse_option_replies(buf)
    if rest:
        raise ValueError(f"{len(rest)} trailing bytes after option replies: {rest[:40]!r}")
    return replies


def check_option_reply(r: OptReply) -> None:
    """Validate the shape of one option reply against the spec."""
    if r.is_error:
        r.data.decode()  # an error message must be a UTF-8 string
        assert len(r.data) <= 4096, r
        assert r.rep in set(Rep), r
    elif r.rep == Rep.ACK:
        assert r.data == b"", r
    elif r.rep == Rep.SERVER:
        r.server()
    elif r.rep == Rep.INFO:
        typ, payload = r.info()
        if typ == Info.EXPORT:
            assert len(payload) == 10, r
        elif typ == Info.BLOCK_SIZE:
            assert len(payload) == 12, r
        else:
            payload.decode()
    elif r.rep == Rep.META_CONTEXT:
        r.meta_context()
    else:
        raise AssertionError(f"unknown option reply type {r.rep:#x}")


# ---- transmission reply parsing ----------------------------------------


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    def error(self) -> tuple[int, str]:
        """(error, message) of an error chunk."""
        assert self.type & (1 << 15), self
        assert len(self.payload) >= 6, self
        err, mlen = struct.unpack_from(">IH", self.payload)
        assert mlen <= len(self.payload) - 6, self
        return err, self.payload[6:6 + mlen].decode()


def parse_replies(buf: bytes, read_lengths: dict[int, int] | None = None
                  ) -> list[SimpleReply | Chunk]:
    """Decode transmission replies making up all of `buf`.

    A successful simple reply carries data only for a read; pass the cookies of reads
    (and their lengths) in `read_lengths`.
    """
    reads = read_lengths or {}
    out: list[SimpleReply | Chunk] = []
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < 4:
            raise ValueError("truncated reply")
        (magic,) = struct.unpack_from(">I", buf, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            if len(buf) - pos < 16:
                raise ValueError("truncated simple reply")
            _, err, cookie = struct.unpack_from(">IIQ", buf, pos)
            pos += 16
            n = reads.get(cookie, 0) if err == 0 else 0
            if len(buf) - pos < n:
                raise ValueError("truncated read data")
            out.append(SimpleReply(err, cookie, bytes(buf[pos:pos + n])))
            pos += n
        elif magic == STRUCTURED_REPLY_MAGIC:
            if len(buf) - pos < 20:
                raise ValueError("truncated chunk header")
            _, flags, typ, cookie, length = struct.unpack_from(">IHHQI", buf, pos)
            pos += 20
            if len(buf) - pos < length:
                raise ValueError("truncated chunk payload")
            out.append(Chunk(flags, typ, cookie, bytes(buf[pos:pos + length])))
            pos += length
        else:
            raise ValueError(f"bad reply magic {magic:#x} at {pos}")
    return out


def check_chunk(c: Chunk) -> None:
    """Validate one structured reply chunk against the spec's length rules."""
    if c.type == Reply.NONE:
        assert c.payload == b"" and c.done, c
    elif c.type == Reply.OFFSET_DATA:
        assert len(c.payload) >= 9, f"OFFSET_DATA chunk length {len(c.payload)} < 9"
    elif c.type == Reply.OFFSET_HOLE:
        assert len(c.payload) == 12, c
        assert struct.unpack_from(">I", c.payload, 8)[0] != 0, "hole size must be nonzero"
    elif c.type == Reply.BLOCK_STATUS:
        assert len(c.payload) >= 12 and (len(c.payload) - 4) % 8 == 0, c
    elif c.type == Reply.ERROR:
        err, _msg = c.error()
        assert err != 0, c
        assert len(c.payload) == 6 + struct.unpack_from(">H", c.payload, 4)[0], c
    else:
        raise AssertionError(f"unexpected chunk type {c.type}")


def as_bytes(ev: Event) -> Event:
    """A copy of `ev` with a write payload converted to bytes, for comparisons."""
    if isinstance(ev, Request) and ev.data is not None:
        return Request(ev.command, ev.flags, ev.cookie, ev.offset, ev.length, bytes(ev.data))
    return ev


# ---- the driver ----------------------------------------------------------


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split `data` at the given offsets (out-of-range and duplicate cuts are ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out = []
    prev = 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return [p for p in out if p]


@dataclass
class Client:
    """Feeds a `ServerConnection` and collects its events and output."""

    conn: ServerConnection
    out: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    greeting: bytes = b""

    @classmethod
    def new(cls, exports: Exports, **kw: Any) -> Client:
        conn = ServerConnection(exports, **kw)
        c = cls(conn)
        c.greeting = conn.data_to_send()
        return c

    def drain(self) -> list[Event]:
        """Pull events until NEED_DATA, collecting output after each."""
        got: list[Event] = []
        for _ in range(100_000):
            ev = self.conn.next_event()
            self.out += self.conn.data_to_send()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, Ready | Request | Disconnect | StartTls), ev
            # A write payload is only valid until the next next_event call: copy it now.
            got.append(as_bytes(ev))
        else:  # pragma: no cover
            raise AssertionError("next_event never returned NEED_DATA")
        self.events += got
        return got

    def send(self, data: bytes, step: int | None = None) -> list[Event]:
        """Feed `data` (in `step`-byte pieces if given), draining events after each piece."""
        got: list[Event] = []
        if not data:
            return got
        step = step or len(data)
        for i in range(0, len(data), step):
            self.conn.receive_data(data[i:i + step])
            got += self.drain()
        return got

    def send_pieces(self, parts: Sequence[bytes], *, scratch: bool = False,
                    direct: bool = False) -> list[Event]:
        """Deliver `parts` one receive each, draining events after each.

        `scratch`: deliver through one reused bytearray (as memoryview slices) that is
        scribbled over as soon as `next_event` has returned NEED_DATA, as an I/O layer
        reusing its receive buffer would. `direct`: whenever the server offers
        `payload_buffer()`, write the bytes straight into it (`recv_into` style).
        """
        got: list[Event] = []
        buf = bytearray(max((len(p) for p in parts), default=0))
        for part in parts:
            rest = memoryview(part)
            while rest:
                pb = self.conn.payload_buffer() if direct else None
                if pb is not None and len(pb):
                    k = min(len(pb), len(rest))
                    pb[:k] = rest[:k]
                    self.conn.payload_received(k)
                elif scratch:
                    k = len(rest)
                    buf[:k] = rest
                    self.conn.receive_data(memoryview(buf)[:k])
                else:
                    k = len(rest)
                    self.conn.receive_data(bytes(rest))
                rest = rest[k:]
                got += self.drain()
                if scratch:
                    buf[:] = b"\xee" * len(buf)
        return got

    def eof(self) -> list[Event]:
        self.conn.receive_data(b"")
        return self.drain()

    def take(self) -> bytes:
        b = bytes(self.out)
        self.out.clear()
        return b

    def replies(self) -> list[OptReply]:
        """All output so far, decoded as option replies (each checked for shape)."""
        rs = option_replies(self.take())
        for r in rs:
            check_option_reply(r)
        return rs

    def tx_replies(self, read_lengths: dict[int, int] | None = None
                   ) -> list[SimpleReply | Chunk]:
        rs = parse_replies(self.take(), read_lengths)
        for r in rs:
            if isinstance(r, Chunk):
                check_chunk(r)
        return rs

    # ---- canned negotiations -------------------------------------------

    def negotiate(self, export: str = "disk", *, structured: bool = False,
                  meta: bool = False, flags: int = BOTH_CLIENT_FLAGS) -> Ready:
        """Client flags, optional STRUCTURED_REPLY / SET_META_CONTEXT, then GO."""
        assert not self.send(client_flags(flags))
        if structured:
            assert not self.send(option(Opt.STRUCTURED_REPLY))
            assert [r.rep for r in self.replies()] == [Rep.ACK]
        if meta:
            assert not self.send(option(Opt.SET_META_CONTEXT,
                                        meta_data(export, "base:allocation")))
            assert [r.rep for r in self.replies()] == [Rep.META_CONTEXT, Rep.ACK]
        evs = self.send(option(Opt.GO, info_data(export)))
        assert len(evs) == 1 and isinstance(evs[0], Ready), evs
        assert self.replies()[-1].rep == Rep.ACK
        return evs[0]
