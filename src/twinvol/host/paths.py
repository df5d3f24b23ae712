"""Paths: one session's NBD connection to one node, and what requests carry.

A `Path` connects, checks and reconnects on its own (backoff 0.1 s to 1 s); the
`Session` (host/session.py) decides what goes over it. Before a path is (re)used its
node's view of the export is fetched again and must carry exactly the session's
virtual identity: two different volumes are never used as one device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from enum import Enum
from typing import Any, Protocol

from twinvol.host.nodes import NodeLink, NodeUnreachable
from twinvol.nbd.aio_client import ConnectionLost, NbdClient, NegotiationError
from twinvol.nbd.client_events import Completed

log = logging.getLogger("twinvol.host")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 1.0
IDLE_RECHECK = 5.0  # blocked/absent paths whose node pushes events: recheck this seldom
CONNECT_TIMEOUT = 3.0
FLAP_TIME = 2.0  # a path that fails sooner than this after coming up is flapping


class PathState(Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    BLOCKED = "blocked"
    MISMATCH = "mismatch"  # the node's volume is not this session's virtual identity
    ABSENT = "absent"  # the node has no such export
    CLOSED = "closed"


class Clock:
    """A coarse clock the agent's ticker advances, so the data path never reads time."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class Responder(Protocol):
    """The client side of a session: where replies go."""

    def reply(self, op: Op, res: Completed) -> None: ...

    def reply_error(self, op: Op, err: int, message: str) -> None: ...


class Hooks(Protocol):
    """What a session needs from the agent."""

    clock: Clock

    def events_up(self, node: str) -> bool: ...

    def count(self, export: str, what: str, n: int = 1) -> None: ...


class Owner(Protocol):
    """What a path and its requests need of their session (host/session.py; a protocol
    rather than an import: the session module imports this one)."""

    export: str
    identity: dict[str, Any]
    peer: str
    hooks: Hooks

    def _path_up(self, path: Path) -> None: ...

    def _path_down(self, path: Path, state: PathState, reason: str) -> None: ...

    def _first_attempt_done(self) -> None: ...

    def _completed(self, op: Op, res: Completed | BaseException) -> None: ...


class Op:
    """One client request on its way through the agent."""

    __slots__ = ("cmd", "cookie", "data", "first_fault", "flags", "length", "offset", "path",
                 "seq", "session", "t0")

    def __init__(self, session: Owner, cmd: int, flags: int, cookie: int, offset: int,
                 length: int, data: bytes | memoryview | None, seq: int = 0,
                 t0: int = 0) -> None:
        self.session = session
        self.cmd = cmd
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data = data  # a write's payload, owned, kept for a retry on another path
        self.path: Path | None = None
        self.seq = seq  # arrival order: re-sent requests keep it
        self.first_fault: float | None = None  # when a path first failed it
        self.t0 = t0  # perf_counter_ns() when read, if timed (host/latency.py); else 0

    def __call__(self, res: Completed | BaseException) -> None:
        """The path's reply (or its loss): the op itself is the callback, no bound method."""
        self.session._completed(self, res)


def identity_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs between two virtual identities, for a human."""
    parts = [f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return ", ".join(parts) or "nothing"


class Path:
    """One NBD connection from a session to one node, with its own reconnect loop."""

    def __init__(self, session: Owner, link: NodeLink, order: int) -> None:
        self.session = session
        self.link = link
        self.node = link.name
        self.order = order
        self.state = PathState.CONNECTING
        self.reason = ""
        self.client: NbdClient | None = None
        self.inflight = 0
        self.requests = 0
        self.primary = False
        self.io_mode: str | None = None
        self.progress = 0.0
        self.up_since = 0.0
        self.read_only = False
        self.draining = False  # faulted: out of use, closed once nothing is in flight
        self._epoch = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged_state: PathState | None = None

    # ---- state ----------------------------------------------------------

    def _set(self, state: PathState, reason: str = "") -> None:
        self.state = state
        self.reason = reason
        if state is not self._logged_state and state is not PathState.UP:
            self._logged_state = state
            level = logging.ERROR if state is PathState.MISMATCH else logging.WARNING
            log.log(level, "path not usable", extra={
                "export": self.session.export, "node": self.node, "state": state.value,
                "reason": reason, "peer": self.session.peer})

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "reason": self.reason, "io_mode": self.io_mode,
                "primary": self.primary, "inflight": self.inflight, "requests": self.requests,
                "draining": self.draining}

    def start(self, view: dict[str, Any] | BaseException | None = None,
              have_view: bool = False) -> None:
        """Run the path: a first attempt (with the node's view if already fetched), then
        reconnect whenever it is down."""
        self._task = asyncio.get_running_loop().create_task(
            self._loop(view, have_view), name=f"path-{self.session.export}-{self.node}")

    def kick(self) -> None:
        """Try to (re)connect now (the node said the export is usable again); a path
        still draining reconnects once it is drained."""
        if not self.draining:
            self._wake.set()

    def drain(self, reason: str) -> None:
        """A path fault: no new requests, the connection stays until the requests on it
        are answered or lost (see host/retry.py)."""
        if self.state is PathState.UP:
            self.session._path_down(self, PathState.DOWN, reason)
        self.draining = True

    def fail(self, reason: str, *, soft: bool = False) -> None:
        """Take the path out of use; in-flight requests come back as lost and are re-sent."""
        if self.state is PathState.UP:
            self.session._path_down(self, PathState.DOWN, reason)
        self._drop_connection(reason, soft=soft)
        self._wake.set()

    def block(self, reason: str) -> None:
        """The node blocked the export (stale copy): stop using it immediately."""
        self._epoch += 1
        self.io_mode = "block"
        if self.state is PathState.UP:
            self.session._path_down(self, PathState.BLOCKED, reason)
        else:
            self._set(PathState.BLOCKED, reason)
        self._drop_connection(reason, soft=False)

    def close(self) -> None:
        self.state = PathState.CLOSED
        if self._task is not None:
            self._task.cancel()
        self._drop_connection("path closed", soft=True)

    def _drop_connection(self, reason: str, *, soft: bool) -> None:
        """Close the path's NBD connection; its in-flight requests come back as lost,
        before this returns (so a reconnect never overlaps requests of the old one)."""
        client = self.client
        if client is not None:
            self.client = None
            client.on_lost = None
            tags = client.conn.take_inflight()
            if soft and not tags:
                client.close()
            else:
                client.abort()
            if tags:
                lost = ConnectionLost(f"node {self.node}: {reason}")
                for tag in tags:
                    tag(lost)

    def _connected(self, client: NbdClient) -> None:
        """The connection is negotiated and checked: put the path in use."""
        self.client = client
        self.read_only = client.read_only
        client.on_lost = self._on_lost
        self._set(PathState.UP)
        self._logged_state = None
        self.session._path_up(self)

    def _on_lost(self, reason: str) -> None:
        if self.client is not None and not self.client.alive:
            self.client = None
        if self.state is PathState.UP:
            self.session._path_down(self, PathState.DOWN, reason)
        self._wake.set()

    # ---- (re)connecting ------------------------------------------------

    async def _loop(self, view: dict[str, Any] | BaseException | None,
                    have_view: bool) -> None:
        loop = asyncio.get_running_loop()
        delay = MIN_BACKOFF
        first = True
        while self.state is not PathState.CLOSED:
            if self.state is PathState.UP:
                await self._wake.wait()
                self._wake.clear()
                if self._flapping(loop.time()):
                    # Up only briefly (a node accepting connections but failing them):
                    # keep backing off rather than reconnecting at full speed.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                else:
                    delay = MIN_BACKOFF
                continue
            self._wake.clear()
            try:
                ok = await self.attempt(view, have_view)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not end the loop for good
                log.exception("path reconnect failed", extra={"node": self.node})
                self._set(PathState.DOWN, f"{type(e).__name__}: {e}")
                ok = False
            finally:
                if first:
                    first = False
                    view, have_view = None, False
                    self.session._first_attempt_done()
            if ok:
                self.up_since = loop.time()
                continue
            if self._wake.is_set():  # kicked while trying
                delay = MIN_BACKOFF
                continue
            wait = delay
            if self.state in (PathState.BLOCKED, PathState.ABSENT, PathState.MISMATCH) \
                    and self.session.hooks.events_up(self.node):
                wait = IDLE_RECHECK  # the node will push the change; this is a safety net
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            delay = MIN_BACKOFF if self._wake.is_set() else min(delay * 2, MAX_BACKOFF)

    def _flapping(self, now: float) -> bool:
        """Failed (not blocked) soon after coming up."""
        return self.state is PathState.DOWN and now - self.up_since < FLAP_TIME

    def _stale(self, epoch: int) -> bool:
        """The path was closed or blocked while an attempt was waiting."""
        return self.state is PathState.CLOSED or epoch != self._epoch

    async def attempt(self, view: dict[str, Any] | BaseException | None,
                      have_view: bool) -> bool:
        """One try: check the node's identity and I/O mode, then connect over NBD."""
        session = self.session
        epoch = self._epoch
        if not have_view:
            try:
                view = await self.link.export(session.export)
            except NodeUnreachable as e:
                view = e
        if self._stale(epoch):
            return False
        if isinstance(view, BaseException):
            self._set(PathState.DOWN, str(view))
            return False
        if view is None:
            self._set(PathState.ABSENT, f"node {self.node} has no export {session.export!r}")
            return False
        ident = view.get("virtual_identity")
        if ident != session.identity:
            diff = identity_diff(session.identity, ident if isinstance(ident, dict) else {})
            self._set(PathState.MISMATCH, f"node {self.node} serves a different volume under "
                                          f"{session.export!r}: {diff}")
            return False
        self.io_mode = view.get("io_mode")
        self.primary = view.get("role") == "primary"
        if self.io_mode == "block":
            self._set(PathState.BLOCKED, f"node {self.node} has {session.export!r} in I/O "
                                         "mode block")
            return False
        host, port = self.link.nbd
        try:
            client = await NbdClient.connect(host, port, session.export, meta_context=True,
                                             timeout=CONNECT_TIMEOUT,
                                             tls=getattr(self.link, "tls", None))
        except NegotiationError as e:
            self._set(PathState.BLOCKED if e.policy else PathState.DOWN,
                      f"node {self.node} refused: {e}")
            return False
        except (OSError, ConnectionLost, TimeoutError) as e:
            self._set(PathState.DOWN, f"node {self.node} NBD {host}:{port}: "
                                      f"{e or type(e).__name__}")
            return False
        if self._stale(epoch):
            client.close()
            return False
        if client.size != session.identity.get("size"):
            client.abort()
            self._set(PathState.MISMATCH, f"node {self.node} exports {client.size} bytes, "
                                          f"the identity says {session.identity.get('size')}")
            return False
        self._connected(client)
        return True
