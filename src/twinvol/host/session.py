"""Sessions: the agent's data path in Python.

A `Session` is one client connection's view of one export: a `Path` (an NBD
client connection) to every node serving the export's virtual identity, a
policy choosing a path per request, and the rules for failure:

- a path whose connection dies, whose node answers a path fault (EIO,
  NBD_ESHUTDOWN...: fenced, blocked, partner lost), that stops replying for
  `io_timeout`, or whose node reports I/O mode `block`, is taken out of use at once;
  its requests are re-sent on another usable path (the rules, and why writes wait
  for the faulted path to drain first, are in `host/retry.py`), and the client sees
  an error only for a fault more than `hold_timeout` after the request's first;
- while no path is usable requests are held (queued, not failed) and every path
  keeps reconnecting; when a path comes back the held requests go out; requests
  held longer than `hold_timeout` fail with EIO, and until a path returns new ones
  fail at once (dm-multipath's no_path_retry);
- an error that is the request's own (EINVAL, EPERM, ENOSPC...) is the client's
  answer, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from time import perf_counter_ns
from typing import Any

from twinvol.host import retry
from twinvol.host.latency import SAMPLE_MASK, VolumeIo, op_stats
from twinvol.host.nodes import NodeLink
from twinvol.host.paths import Hooks, Op, Path, PathState, Responder
from twinvol.host.policy import PathPolicy
from twinvol.nbd.client_events import Completed
from twinvol.nbd.constants import Cmd, Err

log = logging.getLogger("twinvol.host")

OPEN_GRACE = 1.0  # how long a new session waits for its other paths once one is up

_ESHUTDOWN = int(Err.ESHUTDOWN)
_EIO = int(Err.EIO)
_READ_LIKE = frozenset(int(c) for c in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS))


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
        self.parking: retry.Parking[Op] = retry.Parking()
        self._seq = 0
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
        self.latency = VolumeIo()  # timed requests (host/latency.py), until the agent folds them

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
        self.parking.take_all()
        self.up.clear()
        self.writer = None
        for p in self.paths:
            p.close()

    def shutdown(self, message: str) -> None:
        """The agent is stopping: fail the held and parked requests (NBD_ESHUTDOWN), then
        close."""
        held = self.held
        held.extend(self.parking.take_all())
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
        """Ticker: a path (in use or draining) with requests outstanding and no reply for
        io_timeout is dead."""
        for p in self.paths:
            if p.inflight and (p.state is PathState.UP or p.draining) \
                    and now - p.progress > self.io_timeout:
                p.fail(f"no reply from node {p.node} for {self.io_timeout:g} s "
                       f"({p.inflight} requests outstanding)")

    # ---- the data path --------------------------------------------------

    def submit(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
               data: bytes | memoryview | None) -> None:
        self.outstanding += 1
        n = self._seq  # the 1st, 17th, 33rd... request is timed, as the relay does
        self._seq = n + 1
        self._dispatch(Op(self, cmd, flags, cookie, offset, length, data, n + 1,
                          0 if n & SAMPLE_MASK else perf_counter_ns()))

    def _dispatch(self, op: Op) -> None:
        up = self.up
        if not up:
            self._hold(op)
            return
        path: Path | None
        if op.cmd in _READ_LIKE:
            if len(up) == 1:
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
            if path is None:
                path = self.writer = self.policy.write_path(up)
        assert path is not None  # some path is up
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
            path.requests += 1
            if not err:
                self.outstanding -= 1
                r = self.responder
                if r is not None:
                    r.reply(op, res)
                if op.t0:
                    self._timed(op)
            elif not retry.path_fault(err):
                self._answer(op, res)
            else:
                message = res.message or ""
                self._fault(path, op, err, message, retry.fault_reason(path.node, err, message))
                return
            if path.draining and not path.inflight:
                self._drained(path)
            return
        # Connection lost: a path fault like any other.
        self._fault(path, op, _EIO, str(res), str(res))

    def _fault(self, path: Path, op: Op, err: int, message: str, reason: str) -> None:
        """`path` failed `op`: take the path out of use and re-send `op` (at once, or once
        the path has drained) unless its first fault is hold_timeout old."""
        path.drain(reason)
        now = self._clock.now
        if retry.give_up(op.first_fault, now, self.hold_timeout):
            log.error("request failed by its paths for hold_timeout", extra={
                "export": self.export, "node": path.node, "offset": op.offset,
                "reason": reason, "hold_timeout": self.hold_timeout})
            self._answer_error(op, err, message or reason)
        else:
            if op.first_fault is None:
                op.first_fault = now
            if retry.resend_at_once(op.cmd):
                self._retry(op)
            else:
                self.parking.park(path, op)
        if not path.inflight:
            self._drained(path)

    def _drained(self, path: Path) -> None:
        """Nothing is in flight on a faulted path: close it (its loop reconnects, which
        re-checks the node's view) and re-send what waited for it, oldest first."""
        path.draining = False
        path._drop_connection("drained after a path fault", soft=True)
        if path.state is PathState.DOWN:
            path._wake.set()
        for op in self.parking.release(path):
            if self.closed:
                return
            self._retry(op)

    def _retry(self, op: Op) -> None:
        self.retries += 1
        self.hooks.count(self.export, "retries")
        self._dispatch(op)

    def _hold(self, op: Op) -> None:
        if self.failing:
            self._answer_error(op, _EIO, self._no_path_message())
            return
        held = self.held
        if op.first_fault is not None and held and held[-1].seq > op.seq:
            # A re-sent request goes before later arrivals: held ones leave in client order.
            held.insert(next(i for i, h in enumerate(held) if h.seq > op.seq), op)
        else:
            held.append(op)
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
        if op.t0:
            self._timed(op)

    def _timed(self, op: Op) -> None:
        op_stats(self.latency, op.cmd).time(perf_counter_ns() - op.t0)

    def take_latency(self) -> VolumeIo:
        """The session's timed requests so far (the agent adds them to the export's)."""
        return self.latency

    def _answer_error(self, op: Op, err: int, message: str) -> None:
        self.outstanding -= 1
        r = self.responder
        if r is not None:
            r.reply_error(op, err, message)
