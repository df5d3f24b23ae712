"""Peer links between nodes: authenticated, multiplexed request/response over TCP.

One link per pair of nodes (`peer_service.PeerService` keeps them): the node whose
name sorts first dials, with backoff, and the other accepts. Both sides prove they hold
the cluster secret (HMAC over the other side's nonce), so a node refuses peers that are
not in its cluster file. Messages on a link are handled in arrival order, which the
mirrored write path relies on (writes are applied in the order sent).
A link with no traffic for `DEAD_AFTER` seconds is declared down, so a cut
that TCP does not notice (a dead proxy) is still detected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from twinvol import clock
from twinvol.cluster import ClusterConfig
from twinvol.receive import Receiver, nodelay
from twinvol.replication import data_messages as dm
from twinvol.replication.wire import (
    MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    FrameDecoder,
    Header,
    Payload,
    WireError,
    encode,
    encode_parts,
)
from twinvol.tls.context import cert_mismatch

log = logging.getLogger("twinvol.peer")

PING_EVERY = 0.5
DEAD_AFTER = 2.0
HANDSHAKE_TIMEOUT = 3.0

Message = tuple[dict[str, Any], Payload]
# A batch frame's answer: per row, None (success), an exception, or a Later.
Outcomes = list["BaseException | Later | None"]
Handler = Callable[[str, Header, Payload],
                   "Message | Awaitable[Message] | Later | Outcomes | None"]
Done = Callable[[BaseException | None], None]

# Links dropped for a malformed frame, by the receiving node's name (a process runs one
# node, tests several): the node's /metrics shows them as protocol errors on the peer port.
PROTOCOL_ERRORS: Counter[str] = Counter()

FLUSH_NOW = 256 * 1024  # a payload this large leaves at once, not at the end of the step
MAX_ROWS = 4096         # requests in one batch frame
_ACKS = ("acks", "")


def forget(futures: Iterable[asyncio.Future[Message]]) -> None:
    """Stop waiting for replies whose failure is handled already (the link went down,
    the batch was refused): asyncio would log each failed one as "exception never
    retrieved" when it is collected."""
    for fut in futures:
        fut.add_done_callback(_seen)


def _seen(fut: asyncio.Future[Message]) -> None:
    if not fut.cancelled():
        fut.exception()


def _tag(h: Header) -> object:
    """The `t` of a frame header, typed or not (for logs)."""
    return h.get("t") if isinstance(h, dict) else type(h).__struct_config__.tag


class PeerDown(Exception):
    """The link to the peer is down (or went down while a request was in flight)."""


class RemoteError(Exception):
    """The peer handled the request and answered with an error."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class Later:
    """A reply a handler completes later, with no Task or Future in between (the
    mirrored write path answers thousands of these a second)."""

    __slots__ = ("_link", "_result", "_rid")

    def __init__(self) -> None:
        self._link: PeerLink | None = None
        self._rid = 0
        self._result: Message | BaseException | None = None

    def done(self, result: Message | BaseException) -> None:
        """Complete with a reply, or an exception (RemoteError keeps its code)."""
        if self._link is not None:
            self._link._complete(self._rid, result)
        else:
            self._result = result

    def _attach(self, link: PeerLink, rid: int) -> None:
        if self._result is not None:
            link._complete(rid, self._result)
        else:
            self._link, self._rid = link, rid


class LinkOwner(Protocol):
    """What a link needs from the service that owns it (`peer_service.PeerService`)."""

    cluster: ClusterConfig
    node: str
    secret: str
    handler: Handler
    on_refused: Callable[[str, str], None]

    def link_up(self, link: PeerLink) -> None: ...

    def link_down(self, link: PeerLink, reason: str) -> None: ...


def _mac(secret: str, nonce: str, sender: str, receiver: str) -> str:
    msg = f"{nonce}:{sender}:{receiver}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()




class PeerLink(asyncio.BufferedProtocol):
    """One authenticated connection to one peer node.

    A buffered protocol: a large payload is received straight into its own buffer,
    everything else into one reused scratch buffer.
    """

    def __init__(self, service: LinkOwner, dialer_for: str | None) -> None:
        self.service = service
        self.expect = dialer_for  # peer name we dialed, or None when accepting
        self.peer: str | None = None
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(typed=True)
        self.nonce = secrets.token_hex(16)
        self.peer_nonce: str | None = None
        self.authed = False
        self._loop = asyncio.get_running_loop()  # asking per call costs a getpid()
        self.ready = self._loop.create_future()
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.waiting: dict[int, Done] = {}   # requests answered through a callback
        # Payloads of writes this side forwarded to the primary, by request id: the
        # primary's mirrored write refers to them instead of sending them back.
        self.held: dict[int, Payload] = {}
        self.ids = itertools.count(1)
        self.last_rx = clock.monotonic()
        self.closed = False
        self._outq: list[bytes | bytearray | memoryview] = []
        # The frame still being filled: `acks` (ids of requests answered with an empty
        # success) or a batch of requests of one kind and pair (see request_row).
        self._open: tuple[str, str] | None = None
        self._rows: list[Any] = []
        self._parts: list[Payload] = []
        self._plen = 0
        self._flush_scheduled = False
        self._rx = Receiver()

    # ---- asyncio ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        nodelay(transport)
        self._send({"t": "hello", "v": PROTOCOL_VERSION,
                    "cluster": self.service.cluster.cluster.name,
                    "node": self.service.node, "nonce": self.nonce})

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx.buffer(self.decoder.payload_buffer())

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = clock.monotonic()
        try:
            data = self._rx.received(nbytes)
            frames = (self.decoder.payload_received(nbytes) if data is None
                      else self.decoder.feed(data))
        except WireError as e:
            PROTOCOL_ERRORS[self.service.node] += 1
            addr = self.transport.get_extra_info("peername") if self.transport else None
            log.warning("peer protocol error, link dropped", extra={
                "peer": self.peer, "reason": str(e),
                "addr": f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)})
            self._fail(f"bad frame from peer: {e}")
            return
        for header, payload in frames:
            if self.closed:
                return
            try:
                self._on_frame(header, payload)
            except Exception as e:  # a handler bug must not kill the link silently
                log.exception("peer message handling failed", extra={"peer": self.peer})
                self._fail(f"internal error handling {_tag(header)}: {e}")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._down("connection lost" if exc is None else f"connection lost: {exc}")

    # ---- handshake --------------------------------------------------------

    def _on_frame(self, h: Header, payload: Payload) -> None:
        if not isinstance(h, dict):   # a data-path request, already typed by the decoder
            if self.authed:
                self._dispatch(h, payload)
            else:
                self._fail(f"unexpected {_tag(h)!r} during the peer handshake")
            return
        t = h["t"]
        if not self.authed:
            self._handshake(t, h)
            return
        if t == "acks":
            waiting, pending = self.waiting, self.pending
            for rid in h["ids"]:
                cb = waiting.pop(rid, None)
                if cb is not None:
                    cb(None)
                    continue
                f = pending.pop(rid, None)
                if f is not None and not f.done():
                    f.set_result(({"t": "resp", "id": rid}, b""))
            return
        if t == "resp":
            rid = int(h["id"])
            cb = self.waiting.pop(rid, None)
            if cb is not None:
                cb(RemoteError(str(h["error"]), str(h.get("code", "error")))
                   if "error" in h else None)
                return
            fut = self.pending.pop(rid, None)
            if fut is not None and not fut.done():
                if "error" in h:
                    fut.set_exception(RemoteError(str(h["error"]), str(h.get("code", "error"))))
                else:
                    fut.set_result((h, payload))
            return
        if t == "ping":
            return
        self._dispatch(h, payload)

    def _handshake(self, t: str, h: dict[str, Any]) -> None:
        svc = self.service
        if t == "refused":
            self._fail(f"peer refused us: {h.get('reason')}")
            return
        if t == "hello" and self.peer_nonce is None:
            name = h.get("node")
            if h.get("v") != PROTOCOL_VERSION:
                self._refuse(f"protocol version {h.get('v')} is not {PROTOCOL_VERSION}")
                return
            if h.get("cluster") != svc.cluster.cluster.name or name not in svc.cluster.nodes \
                    or name == svc.node:
                self._refuse(f"node {name!r} of cluster {h.get('cluster')!r} is not a peer "
                             "in this cluster file")
                return
            if self.expect is not None and name != self.expect:
                self._refuse(f"dialed {self.expect!r} but {name!r} answered")
                return
            mismatch = cert_mismatch(self.transport, str(name))
            if mismatch is not None:
                self._refuse(mismatch)
                return
            self.peer = str(name)
            self.peer_nonce = str(h.get("nonce", ""))
            self._send({"t": "auth", "mac": _mac(svc.secret, self.peer_nonce, svc.node,
                                                 self.peer)})
            return
        if t == "auth" and self.peer is not None and self.peer_nonce is not None:
            want = _mac(svc.secret, self.nonce, self.peer, svc.node)
            if not hmac.compare_digest(str(h.get("mac", "")), want):
                self._refuse("wrong cluster secret")
                return
            self.authed = True
            svc.link_up(self)
            if not self.ready.done():
                self.ready.set_result(None)
            return
        self._fail(f"unexpected {t!r} during the peer handshake")

    def _refuse(self, reason: str) -> None:
        log.warning("peer refused", extra={"peer": self.peer, "reason": reason})
        self.service.on_refused(self.peer or "?", reason)
        self._send({"t": "refused", "reason": reason})
        self._fail(reason)

    # ---- messaging ----------------------------------------------------------

    def _send(self, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        """Queue a frame; frames queued in one loop iteration leave in one write."""
        if self.transport is None or self.transport.is_closing():
            raise PeerDown(f"link to {self.peer} is closed")
        if self._open is not None:  # frames keep their order
            self._close_open()
        self._outq.extend(encode(header, payload))
        if len(payload) >= FLUSH_NOW:
            self._flush_out()  # the peer starts on it while this side goes on
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_later)

    def _ack(self, rid: int) -> None:
        """An empty success reply: consecutive ones leave as one `acks` frame."""
        if self._open != _ACKS:
            if self._open is not None:
                self._close_open()
            self._open = _ACKS
        self._rows.append(rid)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_later)

    def request_row(self, kind: str, pair: str, fields: list[Any], payload: Payload,
                    done: Done) -> int:
        """Send a request as one row of a batch frame `{"t": kind, "pair": pair, "rows":
        [[id, *fields], ...]}` whose payload is the rows' payloads one after the other:
        consecutive requests of one kind and pair leave as one frame. Answered like
        `request_cb`. Returns the id."""
        if not self.authed or self.closed or self.transport is None \
                or self.transport.is_closing():
            raise PeerDown(f"link to {self.peer} is down")
        n = len(payload)
        cur = self._open
        if cur is None or cur[0] != kind or cur[1] != pair \
                or self._plen + n > MAX_FRAME_PAYLOAD or len(self._rows) >= MAX_ROWS:
            if cur is not None:
                self._close_open()
            self._open = (kind, pair)
        rid = next(self.ids)
        self.waiting[rid] = done
        self._rows.append([rid, *fields])
        if n:
            self._parts.append(payload)
            self._plen += n
        if n >= FLUSH_NOW:
            self._flush_out()  # the peer starts on it while this side goes on
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_later)
        return rid

    def _close_open(self) -> None:
        """Encode the frame being filled into the send queue."""
        kind, pair = self._open  # type: ignore[misc]
        if kind == "acks":
            self._outq.extend(encode({"t": "acks", "ids": self._rows}))
        else:
            self._outq.extend(encode_parts({"t": kind, "pair": pair, "rows": self._rows},
                                           self._parts, self._plen))
            self._parts = []
            self._plen = 0
        self._rows = []
        self._open = None

    def _flush_later(self) -> None:
        self._flush_scheduled = False
        self._flush_out()

    def _flush_out(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._open is not None:
            self._close_open()
        out, self._outq = self._outq, []
        if out:
            self.transport.writelines(out)

    def request(self, header: dict[str, Any],
                payload: bytes | bytearray | memoryview = b"") -> asyncio.Future[Message]:
        """Send a request now (in order with everything else sent) and return its reply."""
        if not self.authed or self.closed:
            raise PeerDown(f"link to {self.peer} is down")
        rid = next(self.ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self.pending[rid] = fut
        self._send({**header, "id": rid}, payload)
        return fut

    def request_cb(self, header: dict[str, Any], payload: Payload, done: Done) -> int:
        """Send a request whose reply only says success or failure; `done(None)` or
        `done(exc)` runs when it arrives (RemoteError, or PeerDown when the link goes
        down). `header` is the caller's fresh dict (it gets the id). Returns the id."""
        if not self.authed or self.closed:
            raise PeerDown(f"link to {self.peer} is down")
        rid = header["id"] = next(self.ids)
        self.waiting[rid] = done
        self._send(header, payload)
        return rid

    def _dispatch(self, h: Header, payload: Payload) -> None:
        rid = h.get("id") if isinstance(h, dict) else (h.id or None)
        try:
            result = self.service.handler(self.peer or "?", h, payload)
        except RemoteError as e:
            for r in self._ids_of(h):
                self._reply_error(r, str(e), e.code)
            return
        except Exception as e:
            log.exception("peer request failed", extra={"peer": self.peer, "t": _tag(h)})
            for r in self._ids_of(h):
                self._reply_error(r, f"{type(e).__name__}: {e}", "internal")
            return
        if isinstance(result, list):  # a batch frame: one outcome per row
            for row_id, res in zip(self._ids_of(h), result, strict=True):
                if res is None:
                    self._ack(row_id)
                elif isinstance(res, Later):
                    res._attach(self, row_id)
                else:
                    self._complete(row_id, res)
            return
        if result is None or rid is None:
            return
        if isinstance(result, tuple):
            self._reply(rid, result)
            return
        if isinstance(result, Later):
            result._attach(self, rid)
            return
        task = asyncio.ensure_future(result)
        task.add_done_callback(lambda f: self._finish(rid, f))

    @staticmethod
    def _ids_of(h: Header) -> list[Any]:
        """The request ids a frame carries: its own, or one per row of a batch."""
        if isinstance(h, dm.WriteBatch | dm.ForwardBatch):
            return [r.rid for r in h.rows]
        if not isinstance(h, dict):
            return [h.id or None]
        rows = h.get("rows")
        if isinstance(rows, list):
            return [r[0] for r in rows if isinstance(r, list) and r]
        return [h.get("id")]

    def _finish(self, rid: int, f: asyncio.Future[Message]) -> None:
        if self.closed:
            return
        exc = f.exception()
        if exc is None:
            self._reply(rid, f.result())
        elif isinstance(exc, RemoteError):
            self._reply_error(rid, str(exc), exc.code)
        else:
            self._reply_error(rid, f"{type(exc).__name__}: {exc}", "internal")

    def _complete(self, rid: int, result: Message | BaseException) -> None:
        if self.closed:
            return
        if not isinstance(result, BaseException):
            self._reply(rid, result)
        elif isinstance(result, RemoteError):
            self._reply_error(rid, str(result), result.code)
        else:
            self._reply_error(rid, f"{type(result).__name__}: {result}", "internal")

    def _reply(self, rid: int, result: Message) -> None:
        header, payload = result
        if not header and not payload:
            self._ack(rid)
            return
        with contextlib.suppress(PeerDown):
            self._send({**header, "t": "resp", "id": rid}, payload)

    def _reply_error(self, rid: Any, message: str, code: str) -> None:
        if rid is None:
            return
        with contextlib.suppress(PeerDown):
            self._send({"t": "resp", "id": rid, "error": message, "code": code})

    def ping(self) -> None:
        with contextlib.suppress(PeerDown):
            self._send({"t": "ping"})

    # ---- teardown -------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._down(reason)

    def _down(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(PeerDown(reason))
            self.ready.exception()  # mark retrieved
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(PeerDown(reason))
        self.pending.clear()
        # Like the futures' callbacks, these run after the link-down handlers.
        loop = asyncio.get_running_loop()
        for cb in self.waiting.values():
            loop.call_soon(cb, PeerDown(reason))
        self.waiting.clear()
        self.held.clear()
        if self.authed:
            self.service.link_down(self, reason)

