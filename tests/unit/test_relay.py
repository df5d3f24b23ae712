"""The native relay (twinvol.host._relay) against the Python reference.

The client side is differential: the same request stream goes to the relay and to the
sans-IO `ServerConnection` (the agent's Python data path), and every reply must be
byte-identical, including error messages, and every valid request must reach the
node unchanged. The path side plays a node over a socketpair: bad replies, EIO,
NBD_ESHUTDOWN, lost paths and holds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdwire import Chunk, Exports, SimpleReply, parse_replies, request

from twinvol.host import relay as relay_mod
from twinvol.nbd.constants import (
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Err,
    Reply,
)
from twinvol.nbd.server import ServerConnection
from twinvol.nbd.server_events import Disconnect, ExportInfo, Request


def test_the_native_relay_is_built() -> None:
    """scripts/setup builds it (pip, with the machine's C compiler): the agent uses it."""
    assert relay_mod.available()

SIZE = 1 << 20
HDR = struct.Struct(">IHHQQI")
CHUNK = struct.Struct(">IHHQI")


def reference(structured: bool, meta: bool, read_only: bool) -> ServerConnection:
    """A ServerConnection negotiated into transmission, as the Python agent has it."""
    from nbdwire import Client

    c = Client.new(Exports(ExportInfo("disk", SIZE, read_only=read_only)))
    c.negotiate("disk", structured=structured, meta=meta)
    c.take()
    return c.conn


@dataclass
class Rig:
    """A relay with a client socket and path sockets played by the test."""

    relay: Any
    client: socket.socket
    paths: list[socket.socket]
    events: list[tuple[Any, ...]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # client bytes drained early

    def ev(self, got: list[tuple[Any, ...]] | None) -> list[tuple[Any, ...]]:
        self.events += got or []
        for e in got or []:
            if e[0] == "path_lost":
                self.relay.remove_path(e[1])
        return got or []

    def pump_client(self) -> None:
        """Let the relay read everything the client sent."""
        for _ in range(1000):
            got = self.relay.client_readable()
            self.ev(got)
            if self.relay.stats()["client_in"] == 0 and not _readable(self.relay.client_fd):
                return
            if any(e[0] in ("client_closed", "pause_client") for e in got or []):
                return

    def node_requests(self, i: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """(flags, cmd, handle, offset, length, payload) of what path i received."""
        data = _drain(self.paths[i])
        out = []
        pos = 0
        while pos < len(data):
            magic, flags, cmd, handle, off, n = HDR.unpack_from(data, pos)
            assert magic == REQUEST_MAGIC
            pos += HDR.size
            payload = b""
            if cmd == Cmd.WRITE:
                payload = data[pos:pos + n]
                pos += n
            out.append((flags, cmd, handle, off, n, payload))
        return out

    def reply(self, i: int, data: bytes) -> list[tuple[Any, ...]]:
        """Send a node's reply as the socket takes it, letting the relay read (and the
        client side drain) in between: a 1 MiB reply does not fit a socket buffer."""
        sock, view = self.paths[i], memoryview(data)
        sock.setblocking(False)
        got: list[tuple[Any, ...]] = []
        while True:
            if view:
                with contextlib.suppress(BlockingIOError):
                    view = view[sock.send(view):]
            for _ in range(1000):
                got += self.ev(self.relay.path_readable(i))
                fd = self.relay.path_fd(i)
                if fd < 0 or not _readable(fd):
                    break
            if not view or self.relay.path_fd(i) < 0:
                return got
            self.drain_client()

    def drain_client(self) -> int:
        """Read what reached the client, then let the relay write what it held back."""
        got = _drain(self.client)
        self.received += got
        self.ev(self.relay.writable(self.relay.client_fd))
        return len(got)

    def client_out(self) -> bytes:
        while self.drain_client():
            pass
        out, self.received = bytes(self.received), bytearray()
        return out


def _readable(fd: int) -> bool:
    import select

    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)


def _drain(s: socket.socket) -> bytes:
    s.setblocking(False)
    out = bytearray()
    while True:
        try:
            b = s.recv(1 << 20)
        except BlockingIOError:
            break
        if not b:
            break
        out += b
    return bytes(out)


@contextmanager
def rig(*, structured: bool = True, meta: bool = True, read_only: bool = False,
        paths: int = 1, ctx: int = 1, size: int = SIZE, **tuning: int) -> Iterator[Rig]:
    relay = relay_mod._relay.Relay(size, **tuning)
    c_test, c_relay = socket.socketpair()
    socks = []
    try:
        r = Rig(relay, c_test, [])
        for i in range(paths):
            p_test, p_relay = socket.socketpair()
            socks.append(p_relay)
            r.paths.append(p_test)
            r.ev(relay.add_path(i, os.dup(p_relay.fileno()), "ABCD"[i], i, i == 0, ctx))
        r.ev(relay.attach_client(os.dup(c_relay.fileno()), structured, meta, read_only, b"",
                                 b""))
        yield r
    finally:
        relay.close()
        for s in (c_test, c_relay, *socks, *r.paths):
            s.close()


def node_reply(req: tuple[int, int, int, int, int, bytes]) -> bytes:
    """What a twinvol node answers (structured negotiated): data for reads, else ok."""
    _flags, cmd, handle, off, n, _ = req
    if cmd == Cmd.READ:
        if n == 0:
            return CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.NONE, handle, 0)
        return (CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.OFFSET_DATA, handle, 8 + n)
                + struct.pack(">Q", off) + pattern(off, n))
    if cmd == Cmd.BLOCK_STATUS:
        return (CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.BLOCK_STATUS, handle, 12)
                + struct.pack(">III", 1, n, 0))
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)


def pattern(off: int, n: int) -> bytes:
    return bytes((off + i) * 7 % 251 for i in range(n))


def reference_replies(conn: ServerConnection, stream: bytes
                      ) -> tuple[bytes, list[Request], Disconnect | None]:
    """Feed `stream`: the state machine's own replies, the valid requests, the end."""
    conn.receive_data(stream)
    out = bytearray()
    reqs: list[Request] = []
    disc = None
    while True:
        ev = conn.next_event()
        out += conn.data_to_send()
        if isinstance(ev, Request):
            data = None if ev.data is None else bytes(ev.data)
            reqs.append(Request(ev.command, ev.flags, ev.cookie, ev.offset, ev.length, data))
        elif isinstance(ev, Disconnect):
            disc = ev
            break
        else:
            break
    return bytes(out), reqs, disc


def answers(conn: ServerConnection, reqs: list[Request]) -> bytes:
    """The Python agent's replies to `reqs` when the node answers as `node_reply`."""
    out = bytearray()
    for r in reqs:
        if r.command == Cmd.READ:
            out += b"".join(conn.reply_read(r.cookie, r.offset, pattern(r.offset, r.length)))
        elif r.command == Cmd.BLOCK_STATUS:
            out += conn.reply_block_status(r.cookie, [(r.length, 0)])
        else:
            out += conn.reply_ok(r.cookie)
    return bytes(out)


def by_cookie(buf: bytes, lengths: dict[int, int]) -> dict[int, Any]:
    replies = parse_replies(buf, lengths)
    out: dict[int, Any] = {}
    for r in replies:
        assert r.cookie not in out, f"two replies for cookie {r.cookie}"
        out[r.cookie] = r
    return out


# ---- the client side, differential --------------------------------------------

CMDS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 77])
FLAGS = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 5, 9, 17]), st.integers(0, 0xFFFF))
OFFSETS = st.one_of(st.sampled_from([0, 4096, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]),
                    st.integers(0, SIZE))
LENGTHS = st.one_of(st.sampled_from([0, 1, 512, 4096, SIZE, MAX_PAYLOAD + 1, 2**32 - 1]),
                    st.integers(0, 8192))


@st.composite
def requests(draw: st.DrawFn) -> list[bytes]:
    out = []
    for cookie in range(draw(st.integers(1, 12))):
        cmd = draw(CMDS)
        flags = draw(FLAGS)
        off = draw(OFFSETS)
        n = draw(LENGTHS)
        if cmd == Cmd.WRITE and 8192 < n <= MAX_PAYLOAD:
            n = draw(st.integers(0, 8192))
        payload = pattern(cookie, n) if cmd == Cmd.WRITE and n <= MAX_PAYLOAD else b""
        magic = REQUEST_MAGIC if draw(st.integers(0, 40)) else 0x12345678
        out.append(request(cmd, flags=flags, cookie=cookie + 1, offset=off, length=n,
                           payload=payload, magic=magic))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=requests(), structured=st.booleans(), meta=st.booleans(),
       read_only=st.booleans())
def test_relay_answers_every_request_as_the_python_server(
        reqs: list[bytes], structured: bool, meta: bool, read_only: bool) -> None:
    meta = meta and structured
    stream = b"".join(reqs)
    ref = reference(structured, meta, read_only)
    own, ref_reqs, disc = reference_replies(ref, stream)
    # A hard disconnect drops what the nodes answer later (the Python agent aborts).
    want = own if disc is not None and disc.error else own + answers(ref, ref_reqs)
    with rig(structured=structured, meta=meta, read_only=read_only) as r:
        r.client.sendall(stream)
        r.pump_client()
        got_reqs = r.node_requests(0)
        # Every valid request reaches the node as the client sent it.
        assert [(q.flags, int(q.command), q.offset, q.length, q.data or b"")
                for q in ref_reqs] == [(f, c, o, n, p) for f, c, _, o, n, p in got_reqs]
        for q in got_reqs:
            r.reply(0, node_reply(q))
        got = r.client_out()
        closed = [e for e in r.events if e[0] == "client_closed"]
        lengths = {q.cookie: q.length for q in ref_reqs if q.command == Cmd.READ}
        assert by_cookie(got, lengths) == by_cookie(want, lengths)
        if disc is not None:
            assert closed == [("client_closed", disc.reason, disc.error)]
        else:
            assert closed == []
        assert r.relay.outstanding == 0


def test_pipelined_bytes_and_pending_reply_go_with_the_client() -> None:
    """Requests read during negotiation and the unsent GO reply are handed over."""
    relay = relay_mod._relay.Relay(SIZE)
    c_test, c_relay = socket.socketpair()
    p_test, p_relay = socket.socketpair()
    try:
        relay.add_path(0, os.dup(p_relay.fileno()), "A", 0, True, 1)
        relay.attach_client(os.dup(c_relay.fileno()), False, False, False,
                            request(Cmd.FLUSH, cookie=9), b"GO-REPLY")
        assert c_test.recv(100) == b"GO-REPLY"
        hdr = p_test.recv(100)
        _magic, _flags, cmd, handle, _off, _n = HDR.unpack(hdr)
        assert cmd == Cmd.FLUSH
        p_test.sendall(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
        relay.path_readable(0)
        assert c_test.recv(100) == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 9)
    finally:
        relay.close()
        for s in (c_test, c_relay, p_test, p_relay):
            s.close()


# ---- large payloads (received straight into place) ------------------------------

def test_large_write_and_read_pass_through_intact() -> None:
    with rig(structured=True, paths=1) as r:
        big = os.urandom(512 * 1024)
        msg = request(Cmd.WRITE, cookie=1, offset=4096, payload=big)
        data = b""
        for i in range(0, len(msg), 100_000):  # the client's bytes arrive in pieces
            r.client.sendall(msg[i:i + 100_000])
            r.pump_client()
            data += _drain(r.paths[0])
        while len(data) < len(msg):  # the node's socket was full: the loop says writable
            assert ("want_write", r.relay.path_fd(0)) in r.events
            r.ev(r.relay.writable(r.relay.path_fd(0)))
            data += _drain(r.paths[0])
        assert r.events[-1] == ("write_idle", r.relay.path_fd(0))
        _flags, cmd, handle, off, n, payload = _parse_one(data)
        assert (cmd, off, n) == (Cmd.WRITE, 4096, len(big)) and payload == big
        r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
        assert r.client_out() == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 1)
        # A 512 KiB read: the node's data arrives in pieces.
        r.client.sendall(request(Cmd.READ, cookie=2, offset=0, length=len(big)))
        r.pump_client()
        (_, _, handle, _, _, _), = r.node_requests(0)
        reply = (CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.OFFSET_DATA, handle, 8 + len(big))
                 + struct.pack(">Q", 0) + big)
        got = b""
        for i in range(0, len(reply), 100_000):
            r.reply(0, reply[i:i + 100_000])
            got += r.client_out()
        while r.relay.stats()["client_out"]:
            r.ev(r.relay.writable(r.relay.client_fd))
            got += r.client_out()
        (c,) = parse_replies(got, {2: len(big)})
        assert isinstance(c, Chunk) and c.cookie == 2 and c.type == Reply.OFFSET_DATA
        assert c.payload[8:] == big


def stream(r: Rig, msg: bytes, path: int = 0, *, until: int | None = None) -> bytes:
    """Send `msg` from the client as its socket takes it, letting the relay read and send
    on, and return what reached the node on `path` until nothing more comes (or, with
    until=N, once N bytes came, leaving the rest in the relay and the node's socket)."""
    view = memoryview(msg)
    r.client.setblocking(False)
    sock = r.paths[path]
    sock.setblocking(False)
    got = bytearray()
    for _ in range(100_000):
        if view:
            with contextlib.suppress(BlockingIOError):
                view = view[r.client.send(view):]
        r.ev(r.relay.client_readable())
        if r.relay.path_fd(path) >= 0:
            r.ev(r.relay.writable(r.relay.path_fd(path)))
        n = len(got)
        with contextlib.suppress(BlockingIOError):
            got += sock.recv(256 * 1024 if until is not None else 1 << 20)
        if until is not None and len(got) >= until:
            break
        if not view and len(got) == n and r.relay.stats()["client_in"] == 0:
            break
    return bytes(got)


LARGE = 64 << 20


def test_large_writes_pass_through_byte_for_byte_at_unaligned_offsets() -> None:
    """1 MiB, 4 MiB and 32 MiB writes, pipelined with a small read between them: each
    large payload goes straight into place (after the first, the relay reads just the
    next header), and the node gets every byte as sent."""
    sizes = [(1 << 20, 12345), (4 << 20, (5 << 20) + 7), (32 << 20, (20 << 20) + 511)]
    with rig(structured=True, paths=1, size=LARGE) as r:
        payloads = [os.urandom(n) for n, _ in sizes]
        msg = (request(Cmd.WRITE, cookie=1, offset=sizes[0][1], payload=payloads[0])
               + request(Cmd.READ, cookie=2, offset=4093, length=4096)
               + b"".join(request(Cmd.WRITE, cookie=3 + i, offset=off, payload=pl)
                          for i, ((_, off), pl) in enumerate(zip(sizes[1:], payloads[1:],
                                                                 strict=True))))
        want = sum(HDR.size + n for n, _ in sizes) + HDR.size
        data = stream(r, msg)
        assert len(data) == want
        reqs = []
        pos = 0
        while pos < len(data):
            q = _parse_one(data[pos:])
            reqs.append(q)
            pos += HDR.size + (q[4] if q[1] == Cmd.WRITE else 0)
        assert [(q[1], q[3], q[4]) for q in reqs] == [
            (Cmd.WRITE, 12345, 1 << 20), (Cmd.READ, 4093, 4096),
            (Cmd.WRITE, (5 << 20) + 7, 4 << 20), (Cmd.WRITE, (20 << 20) + 511, 32 << 20)]
        assert [q[5] for q in reqs if q[1] == Cmd.WRITE] == payloads
        r.reply(0, b"".join(node_reply(q) for q in reqs))
        got = {c.cookie: c for c in parse_replies(r.client_out(), {2: 4096})}
        assert sorted(got) == [1, 2, 3, 4]
        assert got[2].payload[8:] == pattern(4093, 4096)
        assert r.relay.outstanding == 0 and r.relay.stats()["out_bytes"] == 0


def test_a_path_lost_mid_way_through_a_large_write_gets_it_resent_whole() -> None:
    """Node A dies having read a quarter of a 4 MiB write: the relay keeps the payload
    until the write is answered, so B gets the whole request, byte for byte."""
    with rig(paths=2, size=LARGE) as r:
        big = os.urandom(4 << 20)
        msg = request(Cmd.WRITE, cookie=7, offset=(3 << 20) + 3, payload=big)
        part = stream(r, msg, 0, until=1 << 20)
        assert len(part) < len(msg)  # the rest is still on its way to A
        r.paths[0].close()
        r.ev(r.relay.path_readable(0))
        assert ("path_lost", 0, "node A closed the connection") in r.events
        assert ("retried", 1) in r.events
        data = stream(r, b"", 1)
        _flags, cmd, handle, off, n, payload = _parse_one(data)
        assert (cmd, off, n) == (Cmd.WRITE, (3 << 20) + 3, len(big)) and payload == big
        r.reply(1, ok(handle))
        assert r.client_out() == ok(7)


def test_a_client_gone_mid_payload_sends_nothing_on() -> None:
    """After a complete 1 MiB write (the relay then reads just the next header), the
    client sends half of the next one's payload and disconnects: the half write never
    reaches a node, and the relay reports why."""
    with rig(paths=1, size=LARGE) as r:
        first = os.urandom(1 << 20)
        data = stream(r, request(Cmd.WRITE, cookie=1, offset=0, payload=first))
        assert _parse_one(data)[5] == first
        r.reply(0, ok(_parse_one(data)[2]))
        assert r.client_out() == ok(1)
        assert stream(r, request(Cmd.WRITE, cookie=2, offset=0, length=1 << 20)
                      + b"x" * (300 * 1024)) == b""
        r.client.close()
        r.pump_client()
        for _ in range(10):
            r.ev(r.relay.client_readable())
        assert ("client_closed", "client disconnected in the middle of a write payload",
                True) in r.events
        assert _drain(r.paths[0]) == b""
        assert r.relay.path_stats(0)[0] == 0  # nothing in flight on the path


def _parse_one(data: bytes) -> tuple[int, int, int, int, int, bytes]:
    _magic, flags, cmd, handle, off, n = HDR.unpack_from(data)
    return flags, cmd, handle, off, n, data[HDR.size:HDR.size + n]


# ---- the path side ----------------------------------------------------------------

def read_req(r: Rig, i: int) -> tuple[int, int, int, int, int, bytes]:
    (q,) = r.node_requests(i)
    return q


def test_bad_reply_takes_the_path_out_and_the_request_goes_to_the_other() -> None:
    with rig(paths=2) as r:
        r.client.sendall(request(Cmd.WRITE, cookie=5, offset=0, payload=b"x" * 512))
        r.pump_client()
        q = read_req(r, 0)  # writes go to the primary (path 0)
        got = r.reply(0, b"\xde\xad\xbe\xef" * 8)
        assert ("path_lost", 0, "node A sent a reply with bad magic 0xdeadbeef") in got
        assert ("retried", 1) in got
        q1 = read_req(r, 1)
        assert q1[1:2] + q1[3:] == q[1:2] + q[3:]  # the same write, payload included
        r.reply(1, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, q1[2]))
        assert r.client_out() == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 5)


def test_reply_for_a_request_not_in_flight_is_a_bad_path() -> None:
    with rig(paths=2) as r:
        got = r.reply(1, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 12345))
        assert ("path_lost", 1, "node B replied to a request not in flight") in got


def error_chunk(handle: int, err: int, msg: bytes) -> bytes:
    return (CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.ERROR, handle, 6 + len(msg))
            + struct.pack(">IH", err, len(msg)) + msg)


def ok(handle: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)


def test_eio_on_a_read_takes_the_path_out_and_the_read_goes_to_the_other() -> None:
    with rig(structured=True, paths=2) as r:
        r.client.sendall(request(Cmd.READ, cookie=3, offset=0, length=512))
        r.pump_client()
        (i, q), = [(i, q) for i in (0, 1) for q in r.node_requests(i)]
        got = r.reply(i, error_chunk(q[2], Err.EIO, b"bad"))
        why = f"node {'AB'[i]} answered EIO: bad"
        assert got[:3] == [("path_draining", i, why), ("retried", 1), ("path_lost", i, why)]
        q2 = read_req(r, 1 - i)
        r.reply(1 - i, node_reply(q2))
        (c,) = parse_replies(r.client_out(), {3: 512})
        assert isinstance(c, Chunk) and c.cookie == 3 and c.payload[8:] == pattern(0, 512)


def writes(r: Rig, *cookies: int) -> list[tuple[int, int, int, int, int, bytes]]:
    r.client.sendall(b"".join(request(Cmd.WRITE, cookie=k, offset=0, payload=bytes([k]) * 512)
                              for k in cookies))
    r.pump_client()
    return r.node_requests(0)


def test_a_faulted_write_waits_until_older_ones_on_its_path_are_answered() -> None:
    """Writes 1, 2, 3 on path A, A fails 3 (EIO): nothing goes to B while 1 and 2 may
    still land on A; once A has answered them, A is closed and 3 goes to B."""
    with rig(paths=2) as r:
        w1, w2, w3 = writes(r, 1, 2, 3)
        got = r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Err.EIO, w3[2]))
        assert got == [("path_draining", 0, "node A answered EIO")]
        assert r.reply(0, ok(w1[2])) == []
        assert r.node_requests(1) == []
        got = r.reply(0, ok(w2[2]))
        assert got == [("path_lost", 0, "node A answered EIO"), ("retried", 1)]
        assert r.client_out() == ok(1) + ok(2)
        (q,) = r.node_requests(1)
        assert q[5] == b"\x03" * 512
        r.reply(1, ok(q[2]))
        assert r.client_out() == ok(3)


def test_requests_of_a_closed_path_are_resent_in_client_order() -> None:
    """A fails 3, then 1; then 2 is lost with the connection: B gets 1, 2, 3."""
    with rig(paths=2) as r:
        w1, _w2, w3 = writes(r, 1, 2, 3)
        r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Err.EIO, w3[2])
                + SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Err.ESHUTDOWN, w1[2]))
        assert r.node_requests(1) == []
        r.paths[0].close()
        got = r.ev(r.relay.path_readable(0))
        assert got[0] == ("path_lost", 0, "node A closed the connection")
        assert [q[5] for q in r.node_requests(1)] == [bytes([k]) * 512 for k in (1, 2, 3)]
        assert r.client_out() == b""


def test_client_errors_are_answered_and_the_path_stays() -> None:
    with rig(structured=True, paths=2) as r:
        for k, err in enumerate((Err.EPERM, Err.ENOSPC, Err.EINVAL, Err.ENOTSUP)):
            r.client.sendall(request(Cmd.WRITE, cookie=k, offset=0, payload=b"x" * 512))
            r.pump_client()
            q = read_req(r, 0)
            assert r.reply(0, error_chunk(q[2], err, b"no")) == []
            (c,) = parse_replies(r.client_out())
            assert isinstance(c, Chunk) and c.error() == (err, "no")
        assert r.relay.path_fd(0) >= 0 and r.relay.stats()["retries"] == 0


def test_path_faults_are_resent_until_hold_timeout_then_the_node_error() -> None:
    import time

    with rig(structured=True, paths=1, hold_timeout=0.3) as r:
        r.client.sendall(request(Cmd.FLUSH, cookie=5))
        r.pump_client()
        t = time.monotonic()
        while True:
            q = read_req(r, 0)
            got = r.reply(0, error_chunk(q[2], Err.EIO, b"fenced"))
            assert ("path_lost", 0, "node A answered EIO: fenced") in got
            if r.relay.held == 0:
                break
            assert time.monotonic() - t < 0.3  # held, not answered, within hold_timeout
            time.sleep(0.05)
            p_test, p_relay = socket.socketpair()  # the path reconnects
            r.paths[0] = p_test
            r.ev(r.relay.add_path(0, os.dup(p_relay.fileno()), "A", 0, True, 1))
            p_relay.close()
        assert time.monotonic() - t >= 0.3
        (c,) = parse_replies(r.client_out())
        assert isinstance(c, Chunk) and c.cookie == 5 and c.error() == (Err.EIO, "fenced")


def test_eshutdown_fails_the_path_and_resends() -> None:
    with rig(paths=2) as r:
        r.client.sendall(request(Cmd.FLUSH, cookie=4))
        r.pump_client()
        q = read_req(r, 0)
        got = r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Err.ESHUTDOWN, q[2]))
        assert ("path_lost", 0, "node A answered NBD_ESHUTDOWN") in got
        q2 = read_req(r, 1)
        r.reply(1, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, q2[2]))
        assert r.client_out() == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 4)


def test_lost_path_with_no_other_holds_until_a_path_is_added() -> None:
    with rig(paths=1) as r:
        r.client.sendall(request(Cmd.READ, cookie=6, offset=4096, length=100))
        r.pump_client()
        read_req(r, 0)
        r.paths[0].close()
        got = r.ev(r.relay.path_readable(0))
        assert got[0] == ("path_lost", 0, "node A closed the connection")
        assert ("held", 1) in got and r.relay.held == 1
        p_test, p_relay = socket.socketpair()
        try:
            r.paths[0] = p_test
            r.ev(r.relay.add_path(0, os.dup(p_relay.fileno()), "A", 0, True, 1))
            assert r.relay.held == 0
            q = read_req(r, 0)
            r.reply(0, node_reply(q))
            (c,) = parse_replies(r.client_out(), {6: 100})
            assert isinstance(c, Chunk) and c.payload[8:] == pattern(4096, 100)
        finally:
            p_relay.close()


def test_held_requests_fail_with_the_message_and_later_ones_at_once() -> None:
    with rig(structured=True, paths=1) as r:
        r.ev(r.relay.fail_path(0, "blocked by test"))
        r.client.sendall(request(Cmd.FLUSH, cookie=7))
        r.pump_client()
        assert r.relay.held == 1
        r.ev(r.relay.fail_held(Err.EIO, "no usable path (test)", True))
        r.client.sendall(request(Cmd.FLUSH, cookie=8))
        r.pump_client()
        replies = parse_replies(r.client_out())
        assert [(c.cookie, c.error()) for c in replies if isinstance(c, Chunk)] == [
            (7, (Err.EIO, "no usable path (test)")), (8, (Err.EIO, "no usable path (test)"))]


def test_block_status_context_id_is_translated() -> None:
    with rig(structured=True, meta=True, paths=1, ctx=42) as r:
        r.client.sendall(request(Cmd.BLOCK_STATUS, cookie=9, offset=0, length=8192))
        r.pump_client()
        q = read_req(r, 0)
        r.reply(0, CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.BLOCK_STATUS, q[2], 20)
                + struct.pack(">IIIII", 42, 4096, 0, 4096, 3))
        (c,) = parse_replies(r.client_out())
        assert isinstance(c, Chunk) and c.type == Reply.BLOCK_STATUS
        assert c.payload == struct.pack(">IIIII", 1, 4096, 0, 4096, 3)


def test_disc_answers_what_is_in_flight_then_closes() -> None:
    with rig(paths=1) as r:
        r.client.sendall(request(Cmd.FLUSH, cookie=1) + request(Cmd.DISC, cookie=2))
        r.pump_client()
        assert not [e for e in r.events if e[0] == "client_closed"]
        q = read_req(r, 0)
        got = r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, q[2]))
        assert ("client_closed", "client sent NBD_CMD_DISC", False) in got
        assert r.client_out() == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 1)


def test_simple_reply_to_a_read_is_a_bad_path() -> None:
    with rig(paths=1) as r:
        r.client.sendall(request(Cmd.READ, cookie=1, length=10))
        r.pump_client()
        q = read_req(r, 0)
        got = r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, q[2]))
        assert ("path_lost", 0, "node A sent a simple reply to a READ") in got
        assert ("held", 1) in got


def test_reads_are_spread_and_writes_go_to_the_primary() -> None:
    with rig(paths=2) as r:
        for k in range(40):
            r.client.sendall(request(Cmd.READ, cookie=k, offset=k * 512, length=512))
            r.pump_client()
        a, b = r.relay.path_stats(0)[0], r.relay.path_stats(1)[0]
        assert a + b == 40 and a >= 10 and b >= 10
        r.client.sendall(b"".join(request(Cmd.WRITE, cookie=100 + k, offset=0,
                                          payload=b"w" * 10) for k in range(5)))
        r.pump_client()
        assert r.relay.path_stats(0)[0] == a + 5 and r.relay.path_stats(1)[0] == b


def test_requests_wait_for_a_busy_path_only_until_it_answers() -> None:
    """With defer_min=4, new requests for a path with 4 unanswered stay queued until its
    next reply; a path with fewer in flight gets them at once."""
    with rig(paths=1, defer_min=4) as r:
        for k in range(6):
            r.client.sendall(request(Cmd.FLUSH, cookie=k))
            r.pump_client()
        sent = r.node_requests(0)
        assert len(sent) == 4  # the 5th and 6th wait: 4 are with the node
        assert r.relay.path_stats(0)[0] == 6
        r.reply(0, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, sent[0][2]))
        assert len(r.node_requests(0)) == 2  # the reply woke the relay: the rest went out
        assert r.client_out() == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 0)


def test_a_client_that_sends_more_than_the_bound_waits_for_replies() -> None:
    """Past 256 outstanding requests the relay stops parsing and reading the client; the
    rest goes once replies make room (nothing is lost, memory stays bounded)."""
    with rig(paths=1) as r:
        r.relay.close()
        r.relay = relay_mod._relay.Relay(SIZE, defer_min=0)
        p_test, p_relay = socket.socketpair()
        c_test, c_relay = socket.socketpair()
        try:
            r.paths[0], r.client = p_test, c_test
            r.ev(r.relay.add_path(0, os.dup(p_relay.fileno()), "A", 0, True, 1))
            r.ev(r.relay.attach_client(os.dup(c_relay.fileno()), True, True, False, b"", b""))
            r.client.sendall(b"".join(request(Cmd.READ, cookie=k, offset=0, length=512)
                                      for k in range(300)))
            r.ev(r.relay.client_readable())
            assert ("pause_client",) in r.events
            sent = r.node_requests(0)
            assert len(sent) == 256 and r.relay.stats()["client_in"] == 44 * 28
            got = r.reply(0, node_reply(sent[0]))
            assert len(r.node_requests(0)) == 1  # one reply made room for one more
            r.reply(0, b"".join(node_reply(q) for q in sent[1:]))
            rest = r.node_requests(0)
            assert len(rest) == 43 and ("resume_client",) in r.events + got
            r.reply(0, b"".join(node_reply(q) for q in rest))
            cookies = {c.cookie for c in parse_replies(r.client_out(), {})}
            assert len(cookies) == 299  # the last one's reply is still due
        finally:
            p_relay.close()
            c_relay.close()


def test_simple_client_gets_zeroes_for_a_hole() -> None:
    with rig(structured=False, meta=False, paths=1) as r:
        r.client.sendall(request(Cmd.READ, cookie=1, offset=8192, length=3000))
        r.pump_client()
        q = read_req(r, 0)
        r.reply(0, CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, Reply.OFFSET_HOLE, q[2], 12)
                + struct.pack(">QI", 8192, 3000))
        assert parse_replies(r.client_out(), {1: 3000}) == [SimpleReply(0, 1, bytes(3000))]
        assert r.relay.outstanding == 0
