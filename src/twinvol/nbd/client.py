"""Sans-IO NBD client connection: bytes in, events and bytes out.

The mirror image of `twinvol.nbd.server`: no sockets, no clock. The I/O layer
feeds what the server sent with `receive_data`, pulls `Event`s with
`next_event` until `NEED_DATA`, and sends `data_to_send()` (handshake) and the
headers `request()` returns (transmission; a write's payload goes right after
its header).

Negotiation is fixed newstyle only: NO_ZEROES when offered, then
NBD_OPT_STRUCTURED_REPLY, optionally NBD_OPT_SET_META_CONTEXT base:allocation,
then NBD_OPT_GO asking for name, description and block sizes (falling back to
NBD_OPT_EXPORT_NAME if the server does not know GO). One option is in flight at
a time, so each reply is checked against the option it answers. The handshake
is parsed by `nbd/client_options.py`, a request's reply chunks are checked by
`nbd/client_requests.py`, and the events are `nbd/client_events.py`.

Everything the server sends is distrusted: a reply for a cookie not in flight,
a chunk outside its request, a length over the bounds below, an unknown chunk
type... ends the connection with a `ProtocolError` event. Nothing raises for
bad input and nothing is buffered past its bound: option replies are at most
`MAX_OPTION_DATA`, non-data chunks at most `MAX_STATUS_CHUNK`, and read data
goes straight into the request's own buffer (sized by the request, not by the
server). Misuse by the caller (a request before negotiation ended) raises
`ClientStateError`.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any

from twinvol.nbd.client_events import (
    Closed,
    Completed,
    Event,
    Negotiated,
    ProtocolError,
    Refused,
)
from twinvol.nbd.client_options import Negotiation
from twinvol.nbd.client_requests import MAX_ERROR_CHUNK, MAX_STATUS_CHUNK, Pending
from twinvol.nbd.constants import (
    CHUNK_HEADER,
    MAX_PAYLOAD,
    MAX_STRING,
    NEED_DATA,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Err,
    NeedData,
    Reply,
)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_CHUNK_DATA = CHUNK_HEADER.size + 8  # chunk header and the data chunk's offset
_OFFSET_DATA = int(Reply.OFFSET_DATA)
_NONE = int(Reply.NONE)
_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_CHUNK_ERROR_BIT = 1 << 15


class ClientStateError(Exception):
    """The caller used the connection in a way its state does not allow (a local bug)."""


class Phase(Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSING = "closing"  # NBD_CMD_DISC sent: replies still parsed, no new requests
    CLOSED = "closed"


class ClientConnection:
    """One NBD connection, client side, as a pure state machine."""

    def __init__(self, export: str, *, structured: bool = True, meta_context: bool = False,
                 max_read: int = MAX_PAYLOAD, tls: bool = False) -> None:
        raw = export.encode()
        if len(raw) > MAX_STRING:
            raise ClientStateError(f"export name longer than {MAX_STRING} bytes")
        self.export = export
        self.max_read = max_read
        self.phase = Phase.GREETING
        # What negotiation agreed (copied from `_options` when transmission starts).
        self.structured = False
        self.meta_context_id: int | None = None
        self.size = 0
        self.flags = 0
        self.negotiated: Negotiated | None = None
        self._data: bytes | bytearray | memoryview = b""
        self._pos = 0
        self._tail = bytearray()  # unparsed bytes kept between receive_data calls
        self.out: list[bytes] = []  # waiting to be sent (`data_to_send` takes them)
        self._options = Negotiation(export, raw, structured=structured,
                                    meta_context=meta_context, out=self.out, tls=tls)
        self._events: list[Event] = []
        self._inflight: dict[int, Pending] = {}
        self._next_cookie = 0
        # Read data being received straight into a request's buffer.
        self._target: memoryview | None = None
        self._target_req: Pending | None = None
        self._target_done = False

    # ---- byte plumbing -------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the server. An empty `data` means EOF."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            self._close(Closed("server closed the connection"))
            return
        if self._pos < len(self._data):
            # Unparsed bytes remain: keep them in `_tail` and append in place.
            if self._data is not self._tail:
                self._tail[:] = self._data[self._pos:]
            elif self._pos:
                del self._tail[:self._pos]
            self._pos = 0
            self._tail += data
            self._data = self._tail
        else:
            self._data = data
            self._pos = 0

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current read chunk can be received directly, if anywhere."""
        if self._target is None or self._pos < len(self._data):
            return None
        return self._target

    def payload_received(self, n: int) -> None:
        """`n` bytes were written into the view `payload_buffer()` returned."""
        target = self._target
        assert target is not None and n <= len(target)
        self._target = target[n:]

    def data_to_send(self) -> bytes:
        """Handshake bytes to send (transmission requests come from `request()`)."""
        if not self.out:
            return b""
        out = b"".join(self.out)
        self.out.clear()
        return out

    def _stash(self) -> None:
        """Keep only the unparsed bytes, in our own buffer, so the caller may reuse theirs."""
        data = self._data
        rest = len(data) - self._pos
        if data is self._tail:
            if rest:
                del self._tail[:self._pos]
            else:
                self._tail.clear()
                self._data = b""
        elif rest:
            self._tail[:] = data[self._pos:]
            self._data = self._tail
        else:
            self._data = b""
        self._pos = 0

    def _avail(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        b = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return b

    def _close(self, ev: ProtocolError | Closed) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._data = b""
        self._pos = 0
        self._tail = bytearray()
        self._target = None
        self._target_req = None
        self._events.append(ev)

    def _violation(self, reason: str) -> None:
        self._close(ProtocolError(reason))

    def take_inflight(self) -> list[Any]:
        """Tags of every request still waiting for a reply, forgetting them (after a close)."""
        tags = [p.tag for p in self._inflight.values()]
        self._inflight.clear()
        return tags

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # ---- events ---------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """Return the next event, or `NEED_DATA` when more bytes are needed."""
        if not self._events and self.phase is Phase.TRANSMISSION and self._target_req is None:
            ev = self._fast_reply()
            if ev is not None:
                return ev
        while True:
            if self._events:
                return self._events.pop(0)
            phase = self.phase
            if phase is Phase.TRANSMISSION or phase is Phase.CLOSING:
                progressed = self._next_reply()
            elif phase is Phase.OPTIONS or phase is Phase.GREETING:
                progressed = self._negotiate()
            else:
                progressed = False
            if not progressed and not self._events:
                self._stash()
                return NEED_DATA

    def _fast_reply(self) -> Completed | None:
        """The common whole replies in one step: a read's single data chunk, a structured
        or simple success (or simple error) for anything but a read or block status.
        Consumes nothing and returns None for anything else (the general parser decides).
        """
        data = self._data
        pos = self._pos
        avail = len(data) - pos
        if avail < SIMPLE_REPLY.size:
            return None
        magic = _U32.unpack_from(data, pos)[0]
        if magic == STRUCTURED_REPLY_MAGIC:
            if avail < CHUNK_HEADER.size or not self.structured:
                return None
            _, flags, kind, cookie, length = CHUNK_HEADER.unpack_from(data, pos)
            if not flags & REPLY_FLAG_DONE:
                return None
            req = self._inflight.get(cookie)
            if req is None or req.ranges is not None or req.error:
                return None
            command = req.command
            if kind == _OFFSET_DATA:
                n = length - 8
                if (command != _READ or n != req.length or avail < _CHUNK_DATA + n
                        or _U64.unpack_from(data, pos + CHUNK_HEADER.size)[0] != req.offset):
                    return None
                start = pos + _CHUNK_DATA
                self._pos = start + n
                del self._inflight[cookie]
                req.data = bytearray(data[start:start + n])
                return req
            if kind != _NONE or length or command in (_READ, _BLOCK_STATUS):
                return None
            self._pos = pos + CHUNK_HEADER.size
            del self._inflight[cookie]
            return req
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = SIMPLE_REPLY.unpack_from(data, pos)
            req = self._inflight.get(cookie)
            if req is None or req.error or req.command == _READ \
                    or req.command == _BLOCK_STATUS:
                return None
            self._pos = pos + SIMPLE_REPLY.size
            del self._inflight[cookie]
            req.error = error
            return req
        return None

    # ---- negotiation (parsed by nbd/client_options.py) -----------------------

    def _negotiate(self) -> bool:
        pos = self._pos
        self._pos, ev = self._options.receive(self._data, pos)
        if self.phase is Phase.GREETING and self._options.greeted:
            self.phase = Phase.OPTIONS
        if ev is None:
            return self._pos != pos
        if type(ev) is Negotiated:
            self._start_transmission(ev)
        elif type(ev) is Refused:
            self._close(Closed("export refused"))
            self._events.insert(0, ev)
        elif type(ev) is ProtocolError:
            self._close(ev)
        else:  # TlsReady: the I/O layer upgrades, then calls tls_started()
            self._events.append(ev)
        return True

    def tls_started(self) -> None:
        self._options.tls_started()

    def _start_transmission(self, negotiated: Negotiated) -> None:
        self.size = negotiated.size
        self.flags = negotiated.flags
        self.structured = self._options.structured
        self.meta_context_id = self._options.meta_context_id
        self.phase = Phase.TRANSMISSION
        self.negotiated = negotiated
        self._events.append(negotiated)

    # ---- transmission: requests ------------------------------------------

    def request(self, command: int, offset: int, length: int, flags: int = 0,
                tag: Any = None) -> bytes:
        """The header of a new request (send a write's payload right after it)."""
        if self.phase is not Phase.TRANSMISSION:
            raise ClientStateError(f"cannot send a request in phase {self.phase.value}")
        if command == _READ and length > self.max_read:
            raise ClientStateError(f"read of {length} bytes is over the {self.max_read} "
                                   "byte bound")
        if command == _BLOCK_STATUS and self.meta_context_id is None:
            raise ClientStateError("block status needs a negotiated base:allocation context")
        if command == Cmd.DISC:
            return self.disconnect()
        cookie = self._next_cookie = (self._next_cookie + 1) & 0xFFFFFFFFFFFFFFFF
        self._inflight[cookie] = Pending(tag, cookie, command, flags, offset, length)
        return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: no more requests; replies to those in flight are still parsed."""
        if self.phase is not Phase.TRANSMISSION:
            return b""
        self.phase = Phase.CLOSING
        return REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)

    # ---- transmission: replies -------------------------------------------

    def _next_reply(self) -> bool:
        if self._target_req is not None:
            return self._continue_data()
        avail = self._avail()
        if avail < 4:
            return False
        (magic,) = _U32.unpack_from(self._data, self._pos)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply(avail)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                self._violation("structured reply chunk without structured replies negotiated")
                return True
            return self._chunk(avail)
        self._violation(f"bad reply magic {magic:#x}")
        return True

    def _lookup(self, cookie: int) -> Pending | None:
        req = self._inflight.get(cookie)
        if req is None:
            self._violation(f"reply for cookie {cookie:#x}, which is not in flight")
        return req

    def _finish(self, req: Pending) -> None:
        # A violation leaves the request in flight, so `take_inflight` still returns it.
        if req.error:
            del self._inflight[req.cookie]
            req.data = None
            req.extents = None
            self._events.append(req)
            return
        if req.command == _READ and req.covered != req.length:
            self._violation(f"read reply covered {req.covered} of {req.length} bytes")
            return
        if req.command == _BLOCK_STATUS and req.extents is None:
            self._violation("block status reply without a base:allocation chunk")
            return
        del self._inflight[req.cookie]
        self._events.append(req)

    def _simple_reply(self, avail: int) -> bool:
        if avail < SIMPLE_REPLY.size:
            return False
        _, error, cookie = SIMPLE_REPLY.unpack_from(self._data, self._pos)
        self._pos += SIMPLE_REPLY.size
        req = self._lookup(cookie)
        if req is None:
            return True
        if error:
            req.error = error
            self._finish(req)
            return True
        if req.command == _READ:
            # Data follows, as long as the request (structured servers should not do this,
            # but the framing is unambiguous to us since we know the request).
            if req.length:
                req.data = bytearray(req.length)
                req.covered = req.length
                self._target = memoryview(req.data)
                self._target_req = req
                self._target_done = True
                return True
        elif req.command == _BLOCK_STATUS:
            self._violation("simple reply with no extents to a block status request")
            return True
        self._finish(req)
        return True

    def _continue_data(self) -> bool:
        target = self._target
        req = self._target_req
        assert req is not None and target is not None
        n = min(len(target), self._avail())
        if n:
            target[:n] = self._data[self._pos:self._pos + n]
            self._pos += n
            target = self._target = target[n:]
        if len(target):
            return n > 0
        self._target = None
        self._target_req = None
        if self._target_done:
            self._finish(req)
        return True

    def _chunk(self, avail: int) -> bool:
        if avail < CHUNK_HEADER.size:
            return False
        data = self._data
        pos = self._pos
        _, flags, kind, cookie, length = CHUNK_HEADER.unpack_from(data, pos)
        req = self._lookup(cookie)
        if req is None:
            return True
        done = bool(flags & REPLY_FLAG_DONE)
        if kind == _OFFSET_DATA:
            n = length - 8
            if (done and n == req.length and avail >= _CHUNK_DATA + n and req.ranges is None
                    and not req.error
                    and req.command == _READ
                    and _U64.unpack_from(data, pos + CHUNK_HEADER.size)[0] == req.offset):
                # The common case, fast: one chunk with all the data, already here.
                start = pos + _CHUNK_DATA
                self._pos = start + n
                del self._inflight[cookie]
                req.data = bytearray(data[start:start + n])
                self._events.append(req)
                return True
            return self._data_chunk(req, length, done, avail)
        # Every other chunk is read whole, within its bound.
        if kind == Reply.BLOCK_STATUS:
            bound = MAX_STATUS_CHUNK
        elif kind == Reply.NONE:
            bound = 0
        elif kind == Reply.OFFSET_HOLE:
            bound = 12
        else:
            bound = MAX_ERROR_CHUNK
        if length > bound:
            self._violation(f"reply chunk type {kind} of {length} bytes is over its "
                            f"{bound} byte bound")
            return True
        if avail < CHUNK_HEADER.size + length:
            return False
        base = self._pos + CHUNK_HEADER.size
        payload = self._data[base:base + length]
        self._pos = base + length
        if kind == Reply.NONE:
            bad = None if done else "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"
        elif kind == Reply.OFFSET_HOLE:
            bad = req.take_hole(payload)
        elif kind == Reply.BLOCK_STATUS:
            bad = req.take_status(payload, self.meta_context_id)
        elif kind & _CHUNK_ERROR_BIT:
            bad = req.take_error(kind, payload)
        else:
            bad = f"unknown reply chunk type {kind}"
        if bad is not None:
            self._violation(bad)
            return True
        if done:
            self._finish(req)
        return True

    def _data_chunk(self, req: Pending, length: int, done: bool, avail: int) -> bool:
        if req.command != _READ:
            self._violation("NBD_REPLY_TYPE_OFFSET_DATA for a request that is not a read")
            return True
        if length < 9:
            self._violation("NBD_REPLY_TYPE_OFFSET_DATA shorter than 9 bytes")
            return True
        if avail < CHUNK_HEADER.size + 8:
            return False
        (offset,) = _U64.unpack_from(self._data, self._pos + CHUNK_HEADER.size)
        n = length - 8
        bad = req.claim(offset, n)
        if bad is not None:
            self._violation(bad)
            return True
        self._pos += CHUNK_HEADER.size + 8
        if req.data is None:
            req.data = bytearray(req.length)
        req.covered += n
        start = offset - req.offset
        self._target = memoryview(req.data)[start:start + n]
        self._target_req = req
        self._target_done = done
        return True


def errname(err: int) -> str:
    """The spec's name of an NBD error value (NBD_EIO -> "EIO")."""
    try:
        return Err(err).name
    except ValueError:
        return f"error {err}"

__all__ = [
    "NEED_DATA",
    "ClientConnection",
    "ClientStateError",
    "Phase",
    "errname",
]
