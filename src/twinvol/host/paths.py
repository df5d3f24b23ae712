"""Paths and sessions: the agent's data path.

A `Session` is one client connection's view of one export: a `Path` (an NBD
client connection) to every node serving the export's virtual identity, a
policy choosing a path per request, and the rules for failure:

- a path whose connection dies, that answers NBD_ESHUTDOWN, that stops replying
  for `io_timeout`, or whose node reports I/O mode `block`, is taken out of use
  at once; its requests are re-sent on another usable path and the client never
  sees the error;
- while no path is usable requests are held (queued, not failed) and every path
  keeps reconnecting (backoff 0.1 s to 1 s); when a path comes back the held
  requests go out; requests held longer than `hold_timeout` fail with EIO, and
  until a path returns new ones fail at once (dm-multipath's no_path_retry);
- every other error from a healthy path is the client's answer, unchanged
  (EIO alone is first retried once on another path: the other copy may read).

Before a path is (re)used its node's view of the export is fetched again and
must carry exactly the session's virtual identity: two different volumes are
never used as one device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from enum import Enum
from typing import Any, Protocol

from twinvol.host.nodes import NodeLink, NodeUnreachable
from twinvol.host.policy import PathPolicy
from twinvol.nbd.aio_client import ConnectionLost, NbdClient, NegotiationError
from twinvol.nbd.client import Completed
from twinvol.nbd.constants import Cmd, Err

log = logging.getLogger("twinvol.host")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 1.0
IDLE_RECHECK = 5.0  # blocked/absent paths whose node pushes events: recheck this seldom
CONNECT_TIMEOUT = 3.0
FLAP_TIME = 2.0  # a path that fails sooner than this after coming up is flapping
OPEN_GRACE = 1.0  # how long a new session waits for its other paths once one is up

_READ = int(Cmd.READ)
_CACHE = int(Cmd.CACHE)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_ESHUTDOWN = int(Err.ESHUTDOWN)
_EIO = int(Err.EIO)
_READ_LIKE = frozenset((_READ, _CACHE, _BLOCK_STATUS))


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


class Op:
    """One client request on its way through the agent."""

    __slots__ = ("cmd", "cookie", "data", "flags", "length", "offset", "path", "session",
                 "tried")

    def __init__(self, session: Session, cmd: int, flags: int, cookie: int, offset: int,
                 length: int, data: bytes | memoryview | None) -> None:
        self.session = session
        self.cmd = cmd
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data = data  # a write's payload, owned, kept for a retry on another path
        self.path: Path | None = None
        self.tried: list[Path] | None = None  # paths that answered EIO

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

    def __init__(self, session: Session, link: NodeLink, order: int) -> None:
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
                "primary": self.primary, "inflight": self.inflight, "requests": self.requests}

    def start(self, view: dict[str, Any] | BaseException | None = None,
              have_view: bool = False) -> None:
        """Run the path: a first attempt (with the node's view if already fetched), then
        reconnect whenever it is down."""
        self._task = asyncio.get_running_loop().create_task(
            self._loop(view, have_view), name=f"path-{self.session.export}-{self.node}")

    def kick(self) -> None:
        """Try to (re)connect now (the node said the export is usable again)."""
        self._wake.set()

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
        """Close the path's NBD connection; its in-flight requests come back as lost."""
        client = self.client
        if client is not None:
            self.client = None
            client.on_lost = None
            if soft:
                client.close()
            else:
                client.abort()

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
                                             timeout=CONNECT_TIMEOUT)
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


class Session:
    """One client connection's multipath view of one export."""

    path_class: type[Path] = Path

    def __init__(self, hooks: Hooks, export: str, identity: dict[str, Any],
                 links: list[NodeLink], *, hold_timeout: float, io_timeout: float,
                 peer: str = "") -> None:
        self.hooks = hooks
        self.export = export
        self.identity = identity
        self.hold_timeout = hold_timeout
        self.io_timeout = io_timeout
        self.peer = peer
        self.paths = [self.path_class(self, link, i) for i, link in enumerate(links)]
        self.by_node = {p.node: p for p in self.paths}
        self.up: list[Path] = []
        self.writer: Path | None = None
        self._alt: Path | None = None  # the last of two equally busy paths a read took
        self._clock = hooks.clock
        self.policy = PathPolicy()
        self.responder: Responder | None = None
        self.held: deque[Op] = deque()
        self.failing = False  # held past hold_timeout with no path: fail at once
        self._hold_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._changed = asyncio.Event()  # a path came up or finished its first try
        self._first_pending = 0
        self.outstanding = 0
        self.retries = 0
        self.failovers = 0
        self.held_total = 0
        self.hold_failed = 0

    # ---- lifecycle ------------------------------------------------------

    async def open(self, views: dict[str, dict[str, Any] | BaseException | None]) -> None:
        """Start every path; return when each has tried once, or when one is up and
        `OPEN_GRACE` has passed (so a hung node delays the client's negotiation little)."""
        loop = asyncio.get_running_loop()
        self._first_pending = len(self.paths)
        for p in self.paths:
            p.start(views.get(p.node), p.node in views)
        deadline = loop.time() + OPEN_GRACE
        while self._first_pending > 0 and not self.closed:
            if self.up and loop.time() >= deadline:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(),
                                       max(0.0, deadline - loop.time()) if self.up else None)

    def _first_attempt_done(self) -> None:
        self._first_pending -= 1
        self._changed.set()

    @property
    def read_only(self) -> bool:
        return any(p.read_only for p in self.paths)

    def close(self) -> None:
        """Stop every path (their reconnect loops end) and forget held requests."""
        if self.closed:
            return
        self.closed = True
        self._changed.set()  # an `open` still waiting returns
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.held.clear()
        self.up.clear()
        self.writer = None
        for p in self.paths:
            p.close()

    def shutdown(self, message: str) -> None:
        """The agent is stopping: fail the held requests (NBD_ESHUTDOWN), then close."""
        held = self.held
        while held and not self.closed:
            self.hold_failed += 1
            self._answer_error(held.popleft(), _ESHUTDOWN, message)
        self.close()

    def status(self) -> dict[str, Any]:
        return {"export": self.export, "peer": self.peer, "outstanding": self.outstanding,
                "held": self.held_count(), "failing": self.failing, "retries": self.retries,
                "failovers": self.failovers,
                "paths": {p.node: p.status() for p in self.paths}}

    def held_count(self) -> int:
        """Requests waiting for a usable path."""
        return len(self.held)

    def flush_paths(self) -> None:
        """Send the requests queued on every path now rather than at the next loop turn."""
        for p in self.up:
            client = p.client
            if client is not None:
                client.flush()

    # ---- path state changes ---------------------------------------------

    def _path_up(self, path: Path) -> None:
        if self.closed:
            path.close()
            return
        if path not in self.up:
            self.up.append(path)
            self.up.sort(key=lambda p: p.order)
        # Writes fail back to the preferred path (primary, else first configured) when it
        # returns, so every host writes through the same node whenever it can.
        self.writer = None
        self._changed.set()
        log.info("path up", extra={"export": self.export, "node": path.node, "peer": self.peer,
                                   "usable": [p.node for p in self.up]})
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.failing = False
        held = self.held
        if held:
            log.info("releasing held requests", extra={"export": self.export,
                                                       "count": len(held), "node": path.node})
        while held and self.up:
            self._dispatch(held.popleft())

    def _path_down(self, path: Path, state: PathState, reason: str) -> None:
        path._set(state, reason)
        if path in self.up:
            self.up.remove(path)
            if self.writer is path:
                self.writer = None
            self.failovers += 1
            self.hooks.count(self.export, "failovers")
            log.warning("path failed over", extra={
                "export": self.export, "node": path.node, "reason": reason, "peer": self.peer,
                "usable": [p.node for p in self.up]})

    def node_mode(self, node: str, mode: str, reason: str = "") -> None:
        """A node pushed an I/O mode change for this export."""
        path = self.by_node.get(node)
        if path is None or self.closed:
            return
        if mode == "block":
            path.block(reason or f"node {node} put {self.export!r} in I/O mode block")
        else:
            path.io_mode = mode
            if path.state is not PathState.UP:
                path.kick()

    def kick(self, node: str) -> None:
        path = self.by_node.get(node)
        if path is not None and path.state is not PathState.UP:
            path.kick()

    def check_stalls(self, now: float) -> None:
        """Ticker: a path with requests outstanding and no reply for io_timeout is dead."""
        for p in list(self.up):
            if p.inflight and now - p.progress > self.io_timeout:
                p.fail(f"no reply from node {p.node} for {self.io_timeout:g} s "
                       f"({p.inflight} requests outstanding)")

    # ---- the data path --------------------------------------------------

    def submit(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
               data: bytes | memoryview | None) -> None:
        self.outstanding += 1
        self._dispatch(Op(self, cmd, flags, cookie, offset, length, data))

    def _dispatch(self, op: Op) -> None:
        up = self.up
        if not up:
            self._hold(op)
            return
        if op.cmd in _READ_LIKE:
            if op.tried is not None:
                path = self.policy.read_path(up, op.tried)
            elif len(up) == 1:
                path = up[0]
            elif len(up) == 2:
                # Fewest outstanding; equals alternate (the policy's rule, inlined).
                a, b = up
                if a.inflight < b.inflight:
                    path = a
                elif b.inflight < a.inflight:
                    path = b
                else:
                    path = self._alt = b if self._alt is a else a
            else:
                path = self.policy.read_path(up)
        else:
            path = self.writer
            if path is None or op.tried is not None:
                path = self.policy.write_path(up, op.tried)
                if op.tried is None:
                    self.writer = path
        if path is None:  # every usable path already answered EIO: that is the answer
            self._answer_error(op, _EIO, "I/O error on every path")
            return
        client = path.client
        if client is None:  # pragma: no cover - an up path always has a client
            path.fail("no connection")
            self._dispatch(op)
            return
        op.path = path
        if not path.inflight:
            path.progress = self._clock.now
        path.inflight += 1
        client.submit(op.cmd, op.offset, op.length, op.flags, op.data, op)

    def _completed(self, op: Op, res: Completed | BaseException) -> None:
        path = op.path
        assert path is not None
        path.inflight -= 1
        path.progress = self._clock.now
        if self.closed:
            return
        if isinstance(res, Completed):
            err = res.error
            if not err:
                path.requests += 1
                self.outstanding -= 1
                r = self.responder
                if r is not None:
                    r.reply(op, res)
                return
            if err == _ESHUTDOWN:
                # The node is going away; the spec says disconnect softly.
                path.fail(f"node {path.node} answered NBD_ESHUTDOWN", soft=True)
                self._retry(op)
                return
            if err == _EIO and len(self.up) > 1:
                tried = op.tried
                if tried is None:
                    tried = op.tried = []
                if path not in tried:
                    tried.append(path)
                    if any(p not in tried for p in self.up):
                        log.warning("EIO from a path, retrying on another", extra={
                            "export": self.export, "node": path.node, "offset": op.offset,
                            "server_message": res.message})
                        self._retry(op)
                        return
            path.requests += 1
            self._answer(op, res)
            return
        # Connection lost: the path is gone, the request goes elsewhere.
        if path.state is PathState.UP:
            path.fail(str(res))
        self._retry(op)

    def _retry(self, op: Op) -> None:
        self.retries += 1
        self.hooks.count(self.export, "retries")
        self._dispatch(op)

    def _hold(self, op: Op) -> None:
        if self.failing:
            self._answer_error(op, _EIO, self._no_path_message())
            return
        self.held.append(op)
        self.held_total += 1
        self.hooks.count(self.export, "held_total")
        if self._hold_timer is None:
            log.warning("no usable path: holding requests", extra={
                "export": self.export, "peer": self.peer, "hold_timeout": self.hold_timeout,
                "paths": {p.node: p.reason for p in self.paths}})
            self._hold_timer = asyncio.get_running_loop().call_later(
                self.hold_timeout, self._hold_expired)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self.up or self.closed:
            return
        self.failing = True
        msg = self._no_path_message()
        log.error("hold timeout: failing held requests", extra={
            "export": self.export, "count": len(self.held), "peer": self.peer, "reason": msg})
        held = self.held
        while held:
            self.hold_failed += 1
            self._answer_error(held.popleft(), _EIO, msg)
        self.hooks.count(self.export, "hold_failed")

    def _no_path_message(self) -> str:
        why = "; ".join(f"{p.node}: {p.reason or p.state.value}" for p in self.paths)
        return (f"no usable path to {self.export!r} for {self.hold_timeout:g} s ({why})")[:1000]

    def _answer(self, op: Op, res: Completed) -> None:
        self.outstanding -= 1
        r = self.responder
        if r is not None:
            r.reply(op, res)

    def _answer_error(self, op: Op, err: int, message: str) -> None:
        self.outstanding -= 1
        r = self.responder
        if r is not None:
            r.reply_error(op, err, message)
