"""Unit tests of the sans-IO NBD client state machine (twinvol.nbd.client), byte by byte.

A scripted server (the builders below) checks what the client sends and feeds it
replies, well-formed and malformed; an in-memory pairing with the sans-IO server
checks the two state machines understand each other. Malformed server traffic
must end in a `ProtocolError` event: never an exception, never unbounded memory.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdwire import Exports

from twinvol.nbd.client import (
    NEED_DATA,
    ClientConnection,
    ClientStateError,
    Phase,
)
from twinvol.nbd.client_events import Closed, Completed, Event, Negotiated, ProtocolError, Refused
from twinvol.nbd.client_requests import MAX_STATUS_CHUNK
from twinvol.nbd.constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_DATA,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    Info,
    Opt,
    Rep,
    Reply,
    TxFlag,
)
from twinvol.nbd.server import NEED_DATA as SERVER_NEED_DATA
from twinvol.nbd.server import ServerConnection
from twinvol.nbd.server_events import ExportInfo, Request

FLAGS = int(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA)
META_ID = 7

# ---- what a server sends ---------------------------------------------------


def greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(opt: int, rep: int, data: bytes = b"", *, magic: int = OPTION_REPLY_MAGIC,
              length: int | None = None) -> bytes:
    n = len(data) if length is None else length
    return struct.pack(">QIII", magic, opt, rep, n) + data


def info_export(size: int = 1 << 20, flags: int = FLAGS) -> bytes:
    return opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool = True,
          length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind,
                       cookie, n) + payload


def data_chunk(cookie: int, offset: int, data: bytes, *, done: bool = True) -> bytes:
    return chunk(cookie, Reply.OFFSET_DATA, struct.pack(">Q", offset) + data, done=done)


def hole_chunk(cookie: int, offset: int, n: int, *, done: bool = True) -> bytes:
    return chunk(cookie, Reply.OFFSET_HOLE, struct.pack(">QI", offset, n), done=done)


def error_chunk(cookie: int, err: int, msg: bytes = b"", *, done: bool = True,
                offset: int | None = None, kind: int | None = None) -> bytes:
    body = struct.pack(">IH", err, len(msg)) + msg
    if offset is not None:
        body += struct.pack(">Q", offset)
    k = kind if kind is not None else (Reply.ERROR if offset is None else Reply.ERROR_OFFSET)
    return chunk(cookie, k, body, done=done)


def status_chunk(cookie: int, extents: list[tuple[int, int]], *, ctx: int = META_ID,
                 done: bool = True) -> bytes:
    body = struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, Reply.BLOCK_STATUS, body, done=done)


# ---- driving the client -----------------------------------------------------


def events(c: ClientConnection) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = c.next_event()
        if ev is NEED_DATA:
            return out
        assert not isinstance(ev, type(NEED_DATA))
        out.append(ev)


def feed(c: ClientConnection, data: bytes, step: int | None = None) -> list[Event]:
    """Feed `data` (in pieces of `step` bytes if given) and collect the events."""
    out: list[Event] = []
    if step is None:
        c.receive_data(data)
        return events(c)
    for i in range(0, len(data), step):
        c.receive_data(memoryview(bytearray(data[i:i + step])))
        out += events(c)
    return out


def parse_options(sent: bytes) -> list[tuple[int, bytes]]:
    """The options in `sent` (which must be whole options)."""
    out = []
    pos = 0
    while pos < len(sent):
        magic, opt, n = struct.unpack_from(">QII", sent, pos)
        assert magic == IHAVEOPT
        out.append((opt, sent[pos + 16:pos + 16 + n]))
        pos += 16 + n
    return out


def negotiated(*, meta: bool = True, size: int = 1 << 20) -> ClientConnection:
    """A client that went through the full happy-path handshake."""
    c = ClientConnection("disk", meta_context=meta)
    feed(c, greeting())
    c.data_to_send()
    feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    c.data_to_send()
    if meta:
        feed(c, opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                          struct.pack(">I", META_ID) + BASE_ALLOCATION.encode())
             + opt_reply(Opt.SET_META_CONTEXT, Rep.ACK))
        c.data_to_send()
    evs = feed(c, info_export(size) + opt_reply(Opt.GO, Rep.ACK))
    assert isinstance(evs[-1], Negotiated)
    assert c.phase is Phase.TRANSMISSION
    return c


def req_header(hdr: bytes) -> tuple[int, int, int, int, int, int]:
    assert len(hdr) == 28
    return struct.unpack(">IHHQQI", hdr)  # type: ignore[return-value]


def violation(evs: list[Event], c: ClientConnection, words: str) -> None:
    assert evs and isinstance(evs[-1], ProtocolError), evs
    assert words in evs[-1].reason, evs[-1].reason
    assert c.phase is Phase.CLOSED
    assert c.next_event() is NEED_DATA
    c.receive_data(b"more bytes after the end")  # ignored, no exception
    assert c.next_event() is NEED_DATA


# ---- negotiation --------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 3])
def test_full_handshake_bytes_and_info(step: int | None) -> None:
    c = ClientConnection("disk", meta_context=True)
    assert c.data_to_send() == b""  # a client waits for the greeting
    assert feed(c, greeting(), step) == []
    sent = c.data_to_send()
    assert sent[:4] == struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    assert parse_options(sent[4:]) == [(Opt.STRUCTURED_REPLY, b"")]
    assert feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK), step) == []
    [(opt, data)] = parse_options(c.data_to_send())
    query = BASE_ALLOCATION.encode()
    assert opt == Opt.SET_META_CONTEXT
    assert data == struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(query)) + query
    feed(c, opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                      struct.pack(">I", META_ID) + query), step)
    assert feed(c, opt_reply(Opt.SET_META_CONTEXT, Rep.ACK), step) == []
    [(opt, data)] = parse_options(c.data_to_send())
    assert opt == Opt.GO
    assert data == (struct.pack(">I", 4) + b"disk"
                    + struct.pack(">4H", 3, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
    replies = (info_export(12345, FLAGS)
               + opt_reply(Opt.GO, Rep.INFO, struct.pack(">H", Info.NAME) + b"disk")
               + opt_reply(Opt.GO, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + b"my disk")
               + opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096,
                                                         1 << 20))
               + opt_reply(Opt.GO, Rep.INFO, struct.pack(">H", 99) + b"future info")
               + opt_reply(Opt.GO, Rep.ACK))
    evs = feed(c, replies, step)
    assert evs == [Negotiated("disk", 12345, FLAGS, True, True, "disk", "my disk", 1, 4096,
                              1 << 20)]
    assert c.size == 12345 and c.flags == FLAGS and c.meta_context_id == META_ID
    assert c.data_to_send() == b""


def test_no_zeroes_only_when_offered_and_export_name_fallback() -> None:
    c = ClientConnection("old", structured=False)
    feed(c, greeting(FLAG_FIXED_NEWSTYLE))
    sent = c.data_to_send()
    assert sent[:4] == struct.pack(">I", FLAG_C_FIXED_NEWSTYLE)
    assert parse_options(sent[4:])[0][0] == Opt.GO
    # A server without NBD_OPT_GO: the client falls back to NBD_OPT_EXPORT_NAME.
    assert feed(c, opt_reply(Opt.GO, Rep.ERR_UNSUP)) == []
    assert parse_options(c.data_to_send()) == [(Opt.EXPORT_NAME, b"old")]
    reply = struct.pack(">QH", 999, FLAGS) + bytes(124)
    assert feed(c, reply[:100]) == []
    [ev] = feed(c, reply[100:])
    assert isinstance(ev, Negotiated) and ev.size == 999 and not ev.structured
    assert not ev.meta_context


def test_structured_refused_skips_meta_context() -> None:
    c = ClientConnection("d", meta_context=True)
    feed(c, greeting())
    c.data_to_send()
    feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"no"))
    assert parse_options(c.data_to_send())[0][0] == Opt.GO
    [ev] = feed(c, info_export() + opt_reply(Opt.GO, Rep.ACK))
    assert isinstance(ev, Negotiated) and not ev.structured and not ev.meta_context
    with pytest.raises(ClientStateError):
        c.request(Cmd.BLOCK_STATUS, 0, 4096)


def test_meta_context_refused_or_not_offered() -> None:
    for replies in (opt_reply(Opt.SET_META_CONTEXT, Rep.ERR_INVALID, b"nope"),
                    opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
                    opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                              struct.pack(">I", 3) + b"other:ctx")
                    + opt_reply(Opt.SET_META_CONTEXT, Rep.ACK)):
        c = ClientConnection("d", meta_context=True)
        feed(c, greeting())
        feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        feed(c, replies)
        [ev] = feed(c, info_export() + opt_reply(Opt.GO, Rep.ACK))
        assert isinstance(ev, Negotiated) and ev.structured and not ev.meta_context


@pytest.mark.parametrize("rep", [Rep.ERR_POLICY, Rep.ERR_UNKNOWN, Rep.ERR_SHUTDOWN, 0x80000042])
def test_go_refused_is_an_event_then_abort(rep: int) -> None:
    c = ClientConnection("d")
    feed(c, greeting())
    feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    c.data_to_send()
    evs = feed(c, opt_reply(Opt.GO, rep, b"volume d is blocked: stale copy"))
    assert evs[0] == Refused(rep, "volume d is blocked: stale copy")
    assert isinstance(evs[1], Closed)
    assert parse_options(c.data_to_send()) == [(Opt.ABORT, b"")]
    assert c.phase is Phase.CLOSED
    with pytest.raises(ClientStateError):
        c.request(Cmd.READ, 0, 1)


@pytest.mark.parametrize("bad, words", [
    (struct.pack(">QQH", 0x1234, IHAVEOPT, 3), "greeting magic"),
    (struct.pack(">QQ", NBDMAGIC, 0x00420281861253) + bytes(2), "oldstyle"),
    (greeting(0), "fixed newstyle"),
])
def test_bad_greeting(bad: bytes, words: str) -> None:
    c = ClientConnection("d")
    violation(feed(c, bad), c, words)


def _at_structured() -> ClientConnection:
    c = ClientConnection("d", meta_context=True)
    feed(c, greeting())
    c.data_to_send()
    return c


@pytest.mark.parametrize("bad, words", [
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK, magic=0xDEAD), "option reply magic"),
    (opt_reply(Opt.GO, Rep.ACK), "while waiting for option"),
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK, b"x"), "ACK with data"),
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.SERVER), "unexpected reply"),
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK, length=MAX_OPTION_DATA + 1), "bound"),
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, length=0xFFFFFFFF), "bound"),
])
def test_bad_option_replies(bad: bytes, words: str) -> None:
    c = _at_structured()
    violation(feed(c, bad), c, words)


@pytest.mark.parametrize("bad, words", [
    (opt_reply(Opt.GO, Rep.ACK), "without NBD_INFO_EXPORT"),
    (opt_reply(Opt.GO, Rep.INFO, b"\x00"), "too short"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQ", Info.EXPORT, 5)), "wrong length"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HII", Info.BLOCK_SIZE, 1, 2)), "wrong length"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 3, 4096, 1 << 20)),
     "bad block sizes"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 0, 4096, 1 << 20)),
     "bad block sizes"),
    (opt_reply(Opt.GO, Rep.META_CONTEXT, b"12345"), "unexpected reply"),
])
def test_bad_go_replies(bad: bytes, words: str) -> None:
    c = ClientConnection("d")
    feed(c, greeting())
    feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    violation(feed(c, bad), c, words)


def test_short_meta_context_reply() -> None:
    c = _at_structured()
    feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    violation(feed(c, opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"abc")), c,
              "too short")


def test_eof_during_negotiation_and_transmission() -> None:
    c = _at_structured()
    evs = feed(c, b"")
    assert isinstance(evs[0], Closed) and c.phase is Phase.CLOSED
    c = negotiated()
    c.request(Cmd.READ, 0, 10, tag="r")
    [ev] = feed(c, b"")
    assert isinstance(ev, Closed)
    assert c.take_inflight() == ["r"]


def test_request_before_transmission_is_a_local_error() -> None:
    c = ClientConnection("d")
    with pytest.raises(ClientStateError):
        c.request(Cmd.READ, 0, 512)
    with pytest.raises(ClientStateError):
        ClientConnection("x" * 5000)


# ---- transmission: requests -------------------------------------------------------


def test_request_headers_and_unique_cookies() -> None:
    c = negotiated()
    h1 = c.request(Cmd.WRITE, 4096, 512, int(CmdFlag.FUA), tag=1)
    h2 = c.request(Cmd.READ, 0, 1 << 20, int(CmdFlag.DF), tag=2)
    m, flags, cmd, cookie1, off, n = req_header(h1)
    assert (m, flags, cmd, off, n) == (REQUEST_MAGIC, CmdFlag.FUA, Cmd.WRITE, 4096, 512)
    cookie2 = req_header(h2)[3]
    assert cookie1 != cookie2
    assert c.inflight == 2
    with pytest.raises(ClientStateError):
        c.request(Cmd.READ, 0, (32 << 20) + 1)
    disc = c.disconnect()
    assert req_header(disc)[2] == Cmd.DISC
    assert c.phase is Phase.CLOSING
    with pytest.raises(ClientStateError):
        c.request(Cmd.FLUSH, 0, 0)
    # Replies to what was in flight are still delivered after NBD_CMD_DISC.
    [ev] = feed(c, simple(cookie1))
    assert isinstance(ev, Completed) and ev.tag == 1 and ev.error == 0


# ---- transmission: replies ----------------------------------------------------------


def test_simple_replies() -> None:
    c = negotiated()
    w = req_header(c.request(Cmd.WRITE, 0, 4, tag="w"))[3]
    f = req_header(c.request(Cmd.FLUSH, 0, 0, tag="f"))[3]
    evs = feed(c, simple(f, Err.EIO) + simple(w))
    assert [(e.tag, e.error) for e in evs if isinstance(e, Completed)] == [("f", Err.EIO),
                                                                            ("w", 0)]


@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_simple_read_reply_with_data(step: int | None) -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.READ, 100, 10000, tag="r"))[3]
    payload = bytes(range(256)) * 39 + bytes(16)
    evs = feed(c, simple(cookie, 0, payload) + simple(cookie + 99, 0), step)
    assert isinstance(evs[0], Completed) and evs[0].data == payload
    # The second reply names a cookie never sent.
    violation(evs, c, "not in flight")


def test_structured_read_chunks_out_of_order_with_holes() -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.READ, 1000, 300, tag="r"))[3]
    reply = (data_chunk(cookie, 1200, b"c" * 100, done=False)
             + hole_chunk(cookie, 1100, 100, done=False)
             + data_chunk(cookie, 1000, b"a" * 100, done=False)
             + chunk(cookie, Reply.NONE))
    for step in (None, 1, 5):
        c2 = negotiated()
        cookie2 = req_header(c2.request(Cmd.READ, 1000, 300, tag="r"))[3]
        assert cookie2 == cookie
        [ev] = feed(c2, reply, step)
        assert isinstance(ev, Completed) and ev.error == 0
        assert ev.data == b"a" * 100 + bytes(100) + b"c" * 100


def test_structured_read_all_holes_allocates_nothing() -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.READ, 0, 1 << 20, tag="r"))[3]
    [ev] = feed(c, hole_chunk(cookie, 0, 1 << 19, done=False) + hole_chunk(cookie, 1 << 19,
                                                                            1 << 19))
    assert isinstance(ev, Completed) and ev.error == 0 and ev.data is None


def test_read_data_received_in_place() -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.READ, 0, 200000, tag="r"))[3]
    payload = bytes(range(250)) * 800
    whole = data_chunk(cookie, 0, payload)
    c.receive_data(whole[:28 + 10])  # header, offset and 10 bytes of data
    assert c.next_event() is NEED_DATA
    view = c.payload_buffer()
    assert view is not None and len(view) == 200000 - 10
    view[:100000] = whole[38:100038]
    c.payload_received(100000)
    assert c.next_event() is NEED_DATA
    view = c.payload_buffer()
    assert view is not None and len(view) == 200000 - 100010
    c.receive_data(whole[100038:])
    [ev] = events(c)
    assert isinstance(ev, Completed) and ev.data == payload
    assert c.payload_buffer() is None


def test_error_chunks() -> None:
    c = negotiated()
    r = req_header(c.request(Cmd.READ, 0, 4096, tag="r"))[3]
    w = req_header(c.request(Cmd.WRITE, 0, 4096, tag="w"))[3]
    t = req_header(c.request(Cmd.TRIM, 0, 4096, tag="t"))[3]
    evs = feed(c, error_chunk(r, Err.EIO, b"disk on fire", done=False)
               + error_chunk(r, Err.EINVAL, b"second is ignored", done=False)
               + chunk(r, Reply.NONE)
               + error_chunk(w, Err.ENOSPC, b"full", offset=512)
               # An unknown type with the error bit is an error, not a violation.
               + error_chunk(t, Err.EPERM, b"new kind", kind=(1 << 15) + 77))
    done = {e.tag: e for e in evs if isinstance(e, Completed)}
    assert (done["r"].error, done["r"].message) == (Err.EIO, "disk on fire")
    assert (done["w"].error, done["w"].message) == (Err.ENOSPC, "full")
    assert done["t"].error == Err.EPERM
    assert c.phase is Phase.TRANSMISSION


def test_error_then_data_is_still_an_error_and_simple_errors_for_reads() -> None:
    c = negotiated()
    r = req_header(c.request(Cmd.READ, 0, 8, tag="r"))[3]
    r2 = req_header(c.request(Cmd.READ, 0, 8, tag="r2"))[3]
    evs = feed(c, error_chunk(r, Err.EIO, done=False) + data_chunk(r, 0, b"12345678")
               + simple(r2, Err.EINVAL))
    assert [(e.tag, e.error) for e in evs if isinstance(e, Completed)] == [
        ("r", Err.EIO), ("r2", Err.EINVAL)]


def test_block_status() -> None:
    c = negotiated()
    b = req_header(c.request(Cmd.BLOCK_STATUS, 0, 1 << 20, tag="b"))[3]
    one = req_header(c.request(Cmd.BLOCK_STATUS, 0, 4096, int(CmdFlag.REQ_ONE), tag="one"))[3]
    evs = feed(c, status_chunk(b, [(4096, 3), (1 << 19, 0), (1 << 20, 3)])
               + status_chunk(one, [(1 << 20, 1)]))
    done = {e.tag: e for e in evs if isinstance(e, Completed)}
    assert done["b"].extents == [(4096, 3), (1 << 19, 0), (1 << 20, 3)]
    assert done["one"].extents == [(4096, 1)]  # never past the request


@pytest.mark.parametrize("build, words", [
    (lambda k: struct.pack(">I", 0xBADBAD) + bytes(12), "bad reply magic"),
    (lambda k: data_chunk(k, 2000, b"x"), "outside the request"),
    (lambda k: data_chunk(k, 500, b"x" * 600), "outside the request"),
    (lambda k: data_chunk(k, 0, b"x" * 100, done=False) + data_chunk(k, 50, b"y" * 60),
     "overlaps"),
    (lambda k: data_chunk(k, 0, b"x" * 600, done=False) + data_chunk(k, 100, b"y" * 500),
     "overlap"),
    (lambda k: hole_chunk(k, 0, 600, done=False) + data_chunk(k, 599, b"y"), "overlap"),
    (lambda k: chunk(k, Reply.OFFSET_DATA, struct.pack(">Q", 0)), "shorter than 9"),
    (lambda k: hole_chunk(k, 0, 0), "zero bytes"),
    (lambda k: chunk(k, Reply.OFFSET_HOLE, struct.pack(">Q", 0)), "12 bytes"),
    (lambda k: chunk(k, Reply.NONE, done=False), "without NBD_REPLY_FLAG_DONE"),
    (lambda k: chunk(k, Reply.NONE, b"xx"), "bound"),
    (lambda k: chunk(k, 3), "unknown reply chunk type"),
    (lambda k: status_chunk(k, [(1, 0)]), "not block status"),
    (lambda k: data_chunk(k, 0, b"x" * 100), "covered 100 of 1000"),
    (lambda k: chunk(k, Reply.NONE), "covered 0 of 1000"),
    (lambda k: error_chunk(k, 0, b"zero"), "error value 0"),
    (lambda k: chunk(k, Reply.ERROR, struct.pack(">IH", 5, 10) + b"abc"), "runs past"),
    (lambda k: chunk(k, Reply.ERROR_OFFSET, struct.pack(">IH", 5, 0)), "too short"),
    (lambda k: chunk(k, Reply.ERROR, b"", length=1 << 30), "bound"),
    (lambda k: chunk(k + 1, Reply.NONE), "not in flight"),
])
def test_malformed_replies_to_a_read(build: object, words: str) -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.READ, 0, 1000, tag="r"))[3]
    assert callable(build)
    evs = feed(c, build(cookie))
    violation(evs, c, words)
    assert c.take_inflight() == ["r"]


@pytest.mark.parametrize("build, words", [
    (lambda k: data_chunk(k, 0, b"x"), "not a read"),
    (lambda k: hole_chunk(k, 0, 1), "not a read"),
    (lambda k: status_chunk(k, [(1, 0)]), "not block status"),
])
def test_content_chunks_for_a_write(build: object, words: str) -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.WRITE, 0, 1, tag="w"))[3]
    assert callable(build)
    violation(feed(c, build(cookie)), c, words)


@pytest.mark.parametrize("build, words", [
    (lambda k: status_chunk(k, [(1, 0)], ctx=99), "not negotiated"),
    (lambda k: status_chunk(k, [(0, 0)]), "length zero"),
    (lambda k: chunk(k, Reply.BLOCK_STATUS, struct.pack(">II", META_ID, 5)), "not 4 + 8*k"),
    (lambda k: status_chunk(k, [(1, 0)], done=False) + status_chunk(k, [(1, 0)]), "two block"),
    (lambda k: chunk(k, Reply.NONE), "without a base:allocation chunk"),
    (lambda k: simple(k), "simple reply with no extents"),
    (lambda k: chunk(k, Reply.BLOCK_STATUS, b"", length=MAX_STATUS_CHUNK + 8), "bound"),
])
def test_malformed_block_status(build: object, words: str) -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.BLOCK_STATUS, 0, 4096, tag="b"))[3]
    assert callable(build)
    violation(feed(c, build(cookie)), c, words)


def test_structured_chunk_without_negotiation() -> None:
    c = ClientConnection("d", structured=False)
    feed(c, greeting())
    feed(c, info_export() + opt_reply(Opt.GO, Rep.ACK))
    cookie = req_header(c.request(Cmd.FLUSH, 0, 0))[3]
    violation(feed(c, chunk(cookie, Reply.NONE)), c, "without structured replies")


def test_huge_declared_lengths_allocate_nothing() -> None:
    """A server announcing gigabytes gets a ProtocolError, not a buffer that size."""
    tracemalloc.start()
    try:
        for bad in (chunk(1, Reply.BLOCK_STATUS, b"", length=0xFFFFFFFF),
                    chunk(1, Reply.OFFSET_DATA, struct.pack(">Q", 0), length=0xFFFFFFFF)):
            c = negotiated()
            c.request(Cmd.READ if bad[6:8] == b"\x00\x01" else Cmd.BLOCK_STATUS, 0, 4096)
            tracemalloc.reset_peak()
            evs = feed(c, bad + bytes(64 << 10))
            assert isinstance(evs[-1], ProtocolError)
            assert tracemalloc.get_traced_memory()[1] < 2 << 20
    finally:
        tracemalloc.stop()


def test_unparsed_bytes_are_kept_across_calls_without_copying_the_caller() -> None:
    c = negotiated()
    cookie = req_header(c.request(Cmd.WRITE, 0, 1, tag="w"))[3]
    scratch = bytearray(simple(cookie))
    c.receive_data(memoryview(scratch)[:10])
    assert c.next_event() is NEED_DATA
    scratch[:10] = b"\xff" * 10  # the caller reuses its buffer
    c.receive_data(memoryview(bytearray(simple(cookie)))[10:])
    [ev] = events(c)
    assert isinstance(ev, Completed) and ev.tag == "w"
    # Two receive_data calls before any next_event keep both pieces.
    c.request(Cmd.FLUSH, 0, 0, tag="f")
    whole = simple(cookie + 1)
    c.receive_data(whole[:5])
    c.receive_data(whole[5:])
    [ev] = events(c)
    assert isinstance(ev, Completed) and ev.tag == "f"


# ---- fuzzing -------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_bytes_never_raise_during_negotiation(junk: bytes, step: int) -> None:
    c = ClientConnection("d", meta_context=True)
    feed(c, greeting() + junk, step)
    if c.phase is Phase.OPTIONS:
        feed(c, opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK) + junk, step)
    assert len(c._tail) <= MAX_OPTION_DATA + 64


_chunk_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda k, o, d, done: data_chunk(k, o, d, done=done),
              st.integers(0, 4), st.integers(0, 5000), st.binary(max_size=600), st.booleans()),
    st.builds(lambda k, o, n, done: hole_chunk(k, o, n, done=done),
              st.integers(0, 4), st.integers(0, 5000), st.integers(0, 5000), st.booleans()),
    st.builds(lambda k, e, m, done: error_chunk(k, e, m, done=done),
              st.integers(0, 4), st.integers(0, 200), st.binary(max_size=40), st.booleans()),
    st.builds(lambda k, ex, done: status_chunk(k, ex, done=done),
              st.integers(0, 4), st.lists(st.tuples(st.integers(0, 9999), st.integers(0, 3)),
                                          max_size=4), st.booleans()),
    st.builds(lambda k, e: simple(k, e), st.integers(0, 4), st.integers(0, 30)),
    st.builds(lambda k, kind, done: chunk(k, kind, done=done),
              st.integers(0, 4), st.integers(0, (1 << 16) - 1), st.booleans()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chunk_bytes, max_size=12), st.integers(1, 97))
def test_random_replies_never_raise_and_stay_bounded(pieces: list[bytes], step: int) -> None:
    c = negotiated()
    c.request(Cmd.READ, 1000, 4000, tag="r1")
    c.request(Cmd.WRITE, 0, 10, tag="w2")
    c.request(Cmd.BLOCK_STATUS, 0, 10000, tag="b3")
    c.request(Cmd.READ, 0, 600, tag="r4")
    evs = feed(c, b"".join(pieces), step)
    tags = [e.tag for e in evs if isinstance(e, Completed)]
    assert len(tags) == len(set(tags))  # each request completes at most once
    for e in evs:
        if isinstance(e, Completed) and e.error == 0 and e.data is not None:
            assert len(e.data) == {"r1": 4000, "r4": 600}[e.tag]
    assert sum(isinstance(e, ProtocolError | Closed) for e in evs) <= 1
    assert len(c._tail) <= MAX_STATUS_CHUNK + 20 + 97
    # Every request is accounted for exactly once: completed, or still in flight.
    assert sorted(tags + c.take_inflight()) == ["b3", "r1", "r4", "w2"]


# ---- against the sans-IO server -----------------------------------------------------


class _Mem:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)


def _pair(structured: bool = True, meta: bool = True
          ) -> tuple[ClientConnection, ServerConnection, list[Event]]:
    c = ClientConnection("vol", structured=structured, meta_context=meta)
    s = ServerConnection(Exports(ExportInfo("vol", 1 << 20, "the volume")))
    evs: list[Event] = []
    for _ in range(20):
        out = s.data_to_send()
        if out:
            c.receive_data(out)
        evs += events(c)
        sent = c.data_to_send()
        if sent:
            s.receive_data(sent)
        while s.next_event() is not SERVER_NEED_DATA:
            pass
        if c.phase is Phase.TRANSMISSION:
            break
    return c, s, evs


@pytest.mark.parametrize("structured", [True, False])
def test_round_trip_with_the_server_state_machine(structured: bool) -> None:
    c, s, evs = _pair(structured=structured, meta=structured)
    assert isinstance(evs[-1], Negotiated)
    neg = evs[-1]
    assert (neg.size, neg.description, neg.structured, neg.meta_context) == (
        1 << 20, "the volume", structured, structured)
    assert neg.flags & TxFlag.SEND_FLUSH
    mem = _Mem(1 << 20)
    wire = (c.request(Cmd.WRITE, 4096, 5, int(CmdFlag.FUA), tag="w") + b"hello"
            + c.request(Cmd.READ, 4096, 5, tag="r")
            + c.request(Cmd.READ, 1 << 19, 100, tag="hole")
            + c.request(Cmd.READ, (1 << 20) - 2, 10, tag="past-end"))
    if structured:
        wire += c.request(Cmd.BLOCK_STATUS, 0, 8192, tag="bs")
    s.receive_data(wire)
    replies: list[bytes | bytearray | memoryview] = []
    while True:
        ev = s.next_event()
        if s.out:
            replies.append(s.data_to_send())
        if ev is SERVER_NEED_DATA:
            break
        assert isinstance(ev, Request)
        if ev.command == Cmd.WRITE:
            assert ev.data is not None
            mem.buf[ev.offset:ev.offset + ev.length] = ev.data
            replies.append(s.reply_ok(ev.cookie))
        elif ev.command == Cmd.READ and ev.offset == 1 << 19:
            replies.append(s.reply_read_hole(ev.cookie, ev.offset, ev.length))
        elif ev.command == Cmd.READ:
            replies += s.reply_read(ev.cookie, ev.offset,
                                    bytes(mem.buf[ev.offset:ev.offset + ev.length]))
        elif ev.command == Cmd.BLOCK_STATUS:
            replies.append(s.reply_block_status(ev.cookie, [(4096, 3), (4096, 0)]))
    c.receive_data(b"".join(bytes(r) for r in replies))
    done = {e.tag: e for e in events(c) if isinstance(e, Completed)}
    assert done["w"].error == 0
    assert done["r"].data == b"hello"
    assert done["hole"].error == 0
    assert done["hole"].data is None or done["hole"].data == bytes(100)
    assert done["past-end"].error == Err.EINVAL
    if structured:
        assert done["bs"].extents == [(4096, 3), (4096, 0)]
        assert "past the end" in done["past-end"].message
    assert c.phase is Phase.TRANSMISSION and c.inflight == 0
