"""The host agent's native data path, wired into the session and path machinery.

`RelaySession` is a `Session` whose requests and replies never become Python
objects. The C module `twinvol.host._relay` parses the client's requests,
routes them to the path sockets, and relays the replies. The rules are the same
as `Session`'s: reads go to the least busy path, writes go to one path, a lost
path's requests and those a node fails with a path fault are re-sent elsewhere
(`host/retry.py`), and requests are held while no path is usable.

Python keeps everything that is not per request:
- negotiation on both sides, which hands over the sockets afterwards;
- path connecting, identity checks and I/O-mode events;
- the hold timer, stall checks, logs and status.

The relay is driven from the event loop: a readable or writable socket calls into C,
and C returns a list of events (or None) for what Python must act on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from twinvol.host.latency import VolumeIo, fold
from twinvol.host.paths import Path, PathState
from twinvol.host.session import Session
from twinvol.nbd.aio_client import ConnectionLost, NbdClient
from twinvol.nbd.constants import Err

try:
    from twinvol.host import _relay
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _relay = None  # type: ignore[assignment]

log = logging.getLogger("twinvol.host")

_EIO = int(Err.EIO)
_ESHUTDOWN = int(Err.ESHUTDOWN)


def _tuning() -> dict[str, int]:
    """Relay tuning for experiments (bench/): TWINVOL_RELAY_TUNING="defer_min=1,batch_slack=8"."""
    out = {}
    for item in os.environ.get("TWINVOL_RELAY_TUNING", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() in ("defer_min", "batch_slack") and value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def available() -> bool:
    """True when the native data path is built."""
    return _relay is not None


def usable_for(paths: int) -> bool:
    """True when the native data path can serve a session with this many paths."""
    return _relay is not None and paths <= _relay.MAX_PATHS


class RelayPath(Path):
    """A path whose socket, once negotiated, belongs to the session's relay."""

    session: RelaySession

    def __init__(self, session: Session, link: Any, order: int) -> None:
        super().__init__(session, link, order)
        self.fd = -1

    # Requests in flight and answered live in the relay; status reads them there.
    @property
    def inflight(self) -> int:
        s = self.session
        if self.fd < 0 or s.relay is None:
            return 0
        return int(s.relay.path_stats(self.order)[0])

    @inflight.setter
    def inflight(self, value: int) -> None:
        pass

    @property
    def requests(self) -> int:
        s = self.session
        return self._requests + (int(s.relay.path_stats(self.order)[1])
                                 if self.fd >= 0 and s.relay is not None else 0)

    @requests.setter
    def requests(self, value: int) -> None:
        self._requests = value

    def _connected(self, client: NbdClient) -> None:
        try:
            fd = client.detach()
        except ConnectionLost as e:
            client.abort()
            self._set(PathState.DOWN, f"node {self.node}: {e}")
            return
        self.read_only = client.read_only
        ctx = client.conn.meta_context_id or 0
        self.fd = fd
        self._set(PathState.UP)
        self._logged_state = None
        self.session._relay_add(self, fd, ctx)
        self.session._path_up(self)

    def _drop_connection(self, reason: str, *, soft: bool) -> None:
        if self.fd >= 0:
            self.session._relay_drop(self, reason)

    def _lost_in_relay(self, reason: str) -> None:
        """The relay found the connection dead (EOF, error, a bad reply), or closed it
        once it drained after a path fault."""
        if self.state is PathState.UP:
            self.session._path_down(self, PathState.DOWN, reason)
        self._wake.set()


class RelaySession(Session):
    """A session whose data path is the native relay."""

    path_class = RelayPath
    paths: list[RelayPath]  # type: ignore[assignment]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._loop = asyncio.get_running_loop()
        self.relay: Any = _relay.Relay(int(self.identity.get("size") or 0),
                                       hold_timeout=self.hold_timeout, **_tuning())
        # The loop calls the relay directly; Python runs only when it reports events.
        # (A cycle relay -> method -> session -> relay: close() breaks it.)
        self.relay.on_events = self._events
        self.client_fd = -1
        self.on_client_closed: Any = None  # called with (reason, error) once
        self._client_reading = False
        self._writers: set[int] = set()

    # ---- the client ----------------------------------------------------

    def attach_client(self, fd: int, *, structured: bool, meta_context: bool,
                      read_only: bool, pending_in: bytes, pending_out: bytes) -> None:
        """The client's transmission phase starts here: the relay owns `fd` from now on."""
        self.client_fd = fd
        self._client_reading = True
        self._loop.add_reader(fd, self.relay.client_readable)
        self._events(self.relay.attach_client(fd, structured, meta_context, read_only,
                                              pending_in, pending_out))

    @property
    def outstanding(self) -> int:
        return int(self.relay.outstanding) if self.relay is not None else 0

    @outstanding.setter
    def outstanding(self, value: int) -> None:
        pass

    # ---- events from the relay -------------------------------------------

    def _events(self, events: list[tuple[Any, ...]] | None) -> None:
        if not events:
            return
        loop = self._loop
        for ev in events:
            if self.closed:
                return  # the client went away in this batch: its sockets are closed
            kind = ev[0]
            if kind == "path_lost":
                path = self.paths[ev[1]]
                path.draining = False
                self._forget_fd(self.relay.path_fd(ev[1]))
                self.relay.remove_path(ev[1])
                if path.fd >= 0:  # not dropped by Python itself (fail, block, close)
                    self._retire(path)
                    path._lost_in_relay(ev[2])
            elif kind == "held":
                self.held_total += ev[1]
                self.hooks.count(self.export, "held_total", ev[1])
                self._hold_started()
            elif kind == "retried":
                self.retries += ev[1]
                self.hooks.count(self.export, "retries", ev[1])
            elif kind == "path_draining":
                # A path fault: out of use now; `path_lost` follows once it has drained.
                path = self.paths[ev[1]]
                path.draining = True
                if path.state is PathState.UP:
                    self._path_down(path, PathState.DOWN, ev[2])
            elif kind == "want_write":
                self._writers.add(ev[1])
                loop.add_writer(ev[1], self.relay.writable, ev[1])
            elif kind == "write_idle":
                self._writers.discard(ev[1])
                loop.remove_writer(ev[1])
            elif kind == "pause_client":
                if self._client_reading:
                    self._client_reading = False
                    loop.remove_reader(self.client_fd)
            elif kind == "resume_client":
                if not self._client_reading and self.client_fd >= 0:
                    self._client_reading = True
                    loop.add_reader(self.client_fd, self.relay.client_readable)
            elif kind == "client_closed":
                self._client_closed(ev[1], ev[2])

    def _forget_fd(self, fd: int) -> None:
        if fd < 0:
            return
        self._loop.remove_reader(fd)
        if fd in self._writers:
            self._writers.discard(fd)
            self._loop.remove_writer(fd)

    def _client_closed(self, reason: str, error: bool) -> None:
        if error:
            log.warning("client protocol error, hard disconnect",
                        extra={"peer": self.peer, "reason": reason})
        cb, self.on_client_closed = self.on_client_closed, None
        self.close()
        if cb is not None:
            cb(reason, error)

    # ---- paths --------------------------------------------------------------

    def _relay_add(self, path: RelayPath, fd: int, ctx: int) -> None:
        if self.closed:
            os.close(fd)
            path.fd = -1
            return
        self._loop.add_reader(fd, self.relay.path_readable, path.order)
        if self.relay.held:
            log.info("releasing held requests", extra={"export": self.export,
                                                       "count": self.relay.held,
                                                       "node": path.node})
        self._events(self.relay.add_path(path.order, fd, path.node, path.order, path.primary,
                                         ctx))

    def _relay_drop(self, path: RelayPath, reason: str) -> None:
        if self.closed:
            return
        # The relay re-sends the path's requests and reports `path_lost`, which closes it.
        self._retire(path)
        self._events(self.relay.fail_path(path.order, reason))

    def _retire(self, path: RelayPath) -> None:
        """The path's connection leaves the relay: keep its request count."""
        path._requests += int(self.relay.path_stats(path.order)[1])
        path.fd = -1

    def flush_paths(self) -> None:
        pass

    def held_count(self) -> int:
        return int(self.relay.held) if self.relay is not None else 0

    def take_latency(self) -> VolumeIo:
        """The relay times its requests itself: take its samples into the session's."""
        if self.relay is not None:
            fold(self.latency, self.relay.take_latency())
        return self.latency

    # ---- holding -------------------------------------------------------------

    def _hold_started(self) -> None:
        if self._hold_timer is None and not self.closed:
            log.warning("no usable path: holding requests", extra={
                "export": self.export, "peer": self.peer, "hold_timeout": self.hold_timeout,
                "paths": {p.node: p.reason for p in self.paths}})
            self._hold_timer = self._loop.call_later(self.hold_timeout, self._hold_expired)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self.up or self.closed:
            return
        msg = self._no_path_message()
        count = int(self.relay.held)
        log.error("hold timeout: failing held requests", extra={
            "export": self.export, "count": count, "peer": self.peer, "reason": msg})
        self.failing = True
        self.hold_failed += count
        self._events(self.relay.fail_held(_EIO, msg, True))
        self.hooks.count(self.export, "hold_failed")

    def check_stalls(self, now: float) -> None:
        mono = time.monotonic()
        for p in self.paths:  # in use or draining: whatever the relay still has
            if p.fd < 0:
                continue
            inflight, _, progress = self.relay.path_stats(p.order)
            if inflight and mono - progress > self.io_timeout:
                p.fail(f"no reply from node {p.node} for {self.io_timeout:g} s "
                       f"({inflight} requests outstanding)")

    # ---- lifecycle -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["data_path"] = "native"
        return st

    def shutdown(self, message: str) -> None:
        if not self.closed and self.relay is not None:
            self.hold_failed += int(self.relay.held)
            self._events(self.relay.fail_held(_ESHUTDOWN, message, True))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        relay = self.relay
        for p in self.paths:
            assert isinstance(p, RelayPath)
            if relay is not None:  # whatever the relay still has open for this path
                self._forget_fd(relay.path_fd(p.order))
            if p.fd >= 0:
                self._retire(p)
        if self.client_fd >= 0:
            if self._client_reading:
                self._loop.remove_reader(self.client_fd)
            if self.client_fd in self._writers:
                self._writers.discard(self.client_fd)
                self._loop.remove_writer(self.client_fd)
            self._client_reading = False
        if relay is not None:
            relay.flush()
        super().close()
        if relay is not None:
            relay.close()
            relay.on_events = None
            self.client_fd = -1


__all__ = ["RelayPath", "RelaySession", "available", "usable_for"]
