"""A deterministic runtime for the node's real asyncio code (FoundationDB's simulation,
trio's MockClock): each simulated process runs on its own `SimLoop`, an asyncio event
loop over virtual time, and a `World` steps the loops and carries their bytes.

- Time: the world's real time advances only when no loop has work; each loop reads it
  through its process's drifting `Clock` (also installed as `twinvol.clock`'s source, so
  the replication code's leases read it too).
- Transport: `create_server` / `create_connection` are served by an in-memory network of
  ordered byte streams between processes, with delays, link cuts in either direction
  (bytes are held, as TCP retransmits them, and delivered on healing), and resets when a
  process is killed.
- Executor: work sent to an executor runs inline, at once, in the loop's order.
- Faults: `kill` drops a process (its loop never runs again, its peers get resets),
  `pause` stops stepping it (bytes and timers wait), as kill -9 and SIGSTOP do.

Everything random comes from the world's `random.Random(seed)` and ready loops are picked
by it, so a seed replays the same interleaving.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import heapq
import random
import socket
from asyncio import events
from collections.abc import Callable
from typing import Any

from twinvol import clock as clock_port
from twinvol.testing.sim import Clock

Addr = tuple[str, int]
_FIN = object()   # the other side closed its end
_RST = object()   # the other side's process died (or aborted): connection reset
_SYNACK = object()  # the server accepted: the client's connection is made


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """An executor that runs each job at once in the caller: no threads, no races."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class _NoSelector:
    """Nothing to wait for: the world delivers every event as a ready callback."""

    def select(self, timeout: float | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        return None


class SimLoop(asyncio.BaseEventLoop):
    """One simulated process's event loop."""

    def __init__(self, world: World, name: str, clock: Clock) -> None:
        super().__init__()
        self.world = world
        self.name = name
        self.clock = clock
        self.dead = False
        self.paused = False
        self.boot = f"{name}-0"   # the machine's boot: a power loss starts a new one
        self._selector = _NoSelector()
        self._default_executor = InlineExecutor()
        self.endpoints: list[Endpoint] = []
        self.set_exception_handler(world.on_loop_exception)
        clock_port.install(self, self)

    # -- the clock port --
    def time(self) -> float:
        return self.clock.read(self.world.now)

    def monotonic(self) -> float:
        return self.time()

    def wall(self) -> float:
        return 1.8e9 + self.world.now

    def boot_id(self) -> str:
        return self.boot

    # -- what BaseEventLoop leaves to a subclass --
    def _process_events(self, event_list: list[Any]) -> None:
        return None

    def _write_to_self(self) -> None:
        return None

    # -- stepping, for the world --
    def due(self) -> bool:
        if self.dead or self.paused:
            return False
        if self._ready:  # type: ignore[attr-defined]
            return True
        sched = self._scheduled  # type: ignore[attr-defined]
        return bool(sched) and sched[0]._when <= self.time()

    def next_real(self) -> float | None:
        """The world time of this loop's next timer (None: no timer)."""
        if self.dead or self.paused:
            return None
        sched = self._scheduled  # type: ignore[attr-defined]
        while sched and sched[0]._cancelled:
            heapq.heappop(sched)
            count: int = getattr(self, "_timer_cancelled_count", 0)
            self._timer_cancelled_count = max(0, count - 1)
        return self.clock.real_at(sched[0]._when) if sched else None

    def step(self) -> None:
        events._set_running_loop(self)
        try:
            self._run_once()  # type: ignore[attr-defined]
        finally:
            events._set_running_loop(None)

    # -- the network --
    async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol],  # type: ignore[override]
                            host: str | None = None, port: int | None = None,
                            **kw: Any) -> SimServer:
        if host is None or port is None:
            raise OSError("the simulated network needs a host and port to listen on")
        return self.world.net.listen(self, (host, int(port)), protocol_factory)

    async def create_connection(self, protocol_factory: Callable[[], asyncio.BaseProtocol],  # type: ignore[override]
                                host: str | None = None, port: int | None = None,
                                **kw: Any) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        if host is None or port is None:
            raise OSError("the simulated network needs a host and port to connect to")
        return await self.world.net.connect(self, (host, int(port)), protocol_factory)

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


class SimServer:
    """A listener on the simulated network (what `create_server` returns)."""

    def __init__(self, net: Network, loop: SimLoop, addr: Addr,
                 factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.net = net
        self.loop = loop
        self.addr = addr
        self.factory = factory
        self.sockets: list[socket.socket] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.net.listeners.get(self.addr) is self:
            del self.net.listeners[self.addr]

    async def wait_closed(self) -> None:
        return None

    def is_serving(self) -> bool:
        return not self.closed

    async def start_serving(self) -> None:
        return None


class Endpoint(asyncio.Transport):
    """One end of a simulated TCP connection: the transport its protocol writes to."""

    def __init__(self, net: Network, loop: SimLoop, protocol: asyncio.BaseProtocol,
                 local: Addr, remote: Addr) -> None:
        super().__init__()
        self.net = net
        self.loop = loop
        self.protocol = protocol
        self.local = local
        self.remote = remote
        self.peer: Endpoint | None = None
        self.outq: collections.deque[tuple[float, object]] = collections.deque()
        self.closing = False
        self.lost = False
        self.reading = True
        self.stash: list[object] = []   # what arrived while reading was paused
        self.on_open: Callable[[], None] = lambda: None
        loop.endpoints.append(self)

    # -- asyncio.Transport --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        self.net.send(self, bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(bytes(d) for d in list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._shut(_FIN)

    def abort(self) -> None:
        self._shut(_RST)

    def _shut(self, how: object) -> None:
        if self.closing:
            return
        self.closing = True
        self.net.send(self, how)
        self.loop.call_soon(self._lose, None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.remote, "sockname": self.local}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading:
            return
        self.reading = True
        stash, self.stash = self.stash, []
        for item in stash:
            self.loop.call_soon(self.arrive, item)

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # -- delivery (runs on this endpoint's loop) --
    def arrive(self, item: object) -> None:
        if self.lost:
            return
        if not self.reading:
            self.stash.append(item)
            return
        if item is _SYNACK:
            self.on_open()
        elif item is _FIN:
            keep = False
            if isinstance(self.protocol, asyncio.Protocol | asyncio.BufferedProtocol):
                keep = bool(self.protocol.eof_received())
            if not keep:
                self.closing = True
                self._lose(None)
        elif item is _RST:
            self.closing = True
            self._lose(ConnectionResetError("connection reset by peer"))
        else:
            assert isinstance(item, bytes)
            self._feed(item)

    def _feed(self, data: bytes) -> None:
        proto = self.protocol
        if isinstance(proto, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view and not self.lost:
                buf = memoryview(proto.get_buffer(len(view)))
                n = min(len(buf), len(view))
                if n == 0:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buf[:n] = view[:n]
                view = view[n:]
                proto.buffer_updated(n)
        else:
            assert isinstance(proto, asyncio.Protocol)
            proto.data_received(data)

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.protocol.connection_lost(exc)


class Network:
    """Ordered byte streams between simulated processes, with delays and cuts."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.listeners: dict[Addr, SimServer] = {}
        self.cut: set[tuple[str, str]] = set()   # (from, to): bytes that way are held
        self._ports = 40000

    def delay(self) -> float:
        return self.world.rng.uniform(0.0002, 0.003)

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self.cut

    def listen(self, loop: SimLoop, addr: Addr, factory: Callable[[], asyncio.BaseProtocol]
               ) -> SimServer:
        old = self.listeners.get(addr)
        if old is not None and not old.loop.dead and not old.closed:
            raise OSError(98, f"address {addr[0]}:{addr[1]} already in use")
        server = self.listeners[addr] = SimServer(self, loop, addr, factory)
        return server

    async def connect(self, loop: SimLoop, addr: Addr,
                      protocol_factory: Callable[[], asyncio.BaseProtocol]
                      ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """Open a connection: the SYN waits while the link is cut (TCP retries it), is
        refused when nothing listens, else both ends get `connection_made`."""
        fut: asyncio.Future[tuple[asyncio.Transport, asyncio.BaseProtocol]] = \
            loop.create_future()
        self._ports += 1
        client = Endpoint(self, loop, protocol_factory(), (loop.name, self._ports), addr)

        def syn() -> None:
            server = self.listeners.get(addr)
            if server is None or server.closed or server.loop.dead:
                refused = ConnectionRefusedError(111, f"connect to {addr} refused")
                self.world.at(self.world.now + self.delay(), loop.call_soon, _fail, fut, refused)
                return
            if self.blocked(loop.name, server.loop.name):
                self.world.wait_heal(syn)
                return
            server.loop.call_soon(accept, server)

        def accept(server: SimServer) -> None:
            if server.closed or loop.dead or client.closing:
                return
            srv = Endpoint(self, server.loop, server.factory(), addr, client.local)
            client.peer, srv.peer = srv, client
            self.send(srv, _SYNACK)   # ahead of anything the server side writes
            srv.protocol.connection_made(srv)

        client.on_open = lambda: _made(fut, client)
        self.world.at(self.world.now + self.delay(), syn)
        return await fut

    def send(self, src: Endpoint, item: object) -> None:
        """Queue `item` from `src` to its peer, in order, after a delay."""
        dst = src.peer
        if dst is None:
            return
        when = self.world.now + self.delay()
        if src.outq:
            when = max(when, src.outq[-1][0])
        src.outq.append((when, item))
        if len(src.outq) == 1:
            self.world.at(when, self._pump, src)

    def _pump(self, src: Endpoint) -> None:
        dst = src.peer
        assert dst is not None
        while src.outq and src.outq[0][0] <= self.world.now:
            if dst.loop.dead:
                src.outq.clear()
                return
            if self.blocked(src.loop.name, dst.loop.name):
                self.world.wait_heal(lambda: self._pump(src))
                return
            _, item = src.outq.popleft()
            dst.loop.call_soon(dst.arrive, item)
        if src.outq:
            self.world.at(src.outq[0][0], self._pump, src)

    def reset_all(self, loop: SimLoop) -> None:
        """`loop`'s process died: its peers get a reset (once the link lets it through)."""
        for ep in loop.endpoints:
            ep.outq.clear()
            if not ep.lost and not ep.closing:
                ep.closing = True
                self.send(ep, _RST)
        loop.endpoints.clear()
        for addr, server in list(self.listeners.items()):
            if server.loop is loop:
                del self.listeners[addr]


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _made(fut: asyncio.Future[tuple[asyncio.Transport, asyncio.BaseProtocol]],
          client: Endpoint) -> None:
    if fut.done():   # the caller gave up (a timeout): close what it will never use
        client.abort()
        return
    client.protocol.connection_made(client)
    fut.set_result((client, client.protocol))


class World:
    """Simulated real time, the processes' loops and the network between them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loops: dict[str, SimLoop] = {}
        self.graveyard: list[SimLoop] = []   # killed loops, kept so nothing of them runs
        self.net = Network(self)
        self.errors: list[str] = []
        self._events: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = 0
        self._on_heal: list[Callable[[], None]] = []

    def loop(self, name: str, clock: Clock) -> SimLoop:
        loop = self.loops[name] = SimLoop(self, name, clock)
        return loop

    def at(self, when: float, fn: Callable[..., object], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (max(when, self.now), self._seq, fn, args))

    def wait_heal(self, fn: Callable[[], None]) -> None:
        self._on_heal.append(fn)

    def set_cut(self, pairs: set[tuple[str, str]]) -> None:
        """Cut exactly these directed links; bytes held on the others flow again."""
        self.net.cut = set(pairs)
        waiting, self._on_heal = self._on_heal, []
        for fn in waiting:
            self.at(self.now, fn)

    def kill(self, name: str) -> None:
        loop = self.loops.pop(name)
        loop.dead = True
        clock_port.remove(loop)
        self.net.reset_all(loop)
        self.graveyard.append(loop)

    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        msg = ctx.get("message", "")
        if isinstance(exc, asyncio.CancelledError) or "was destroyed but it is pending" in msg:
            return
        name = getattr(loop, "name", "?")
        self.errors.append(f"{self.now:.3f} {name}: {msg} {type(exc).__name__ if exc else ''}"
                           f" {exc or ''}".rstrip())

    def run_until(self, end: float) -> None:
        while True:
            ready = [lp for lp in self.loops.values() if lp.due()]
            if ready:
                self.rng.choice(ready).step()
                continue
            nxt = self._events[0][0] if self._events else None
            for lp in self.loops.values():
                t = lp.next_real()
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
            if nxt is None or nxt > end:
                self.now = max(self.now, end)
                return
            self.now = max(self.now, nxt)
            while self._events and self._events[0][0] <= self.now:
                _, _, fn, args = heapq.heappop(self._events)
                fn(*args)

    def close(self) -> None:
        """End every process now, killed ones too: their coroutines are closed here, in
        order, rather than finalised later by the garbage collector (during another
        seed's run, on a closed loop)."""
        for loop in [*self.loops.values(), *self.graveyard]:
            clock_port.remove(loop)
            loop.dead = True
            for task in asyncio.all_tasks(loop):
                with contextlib.suppress(BaseException):
                    task.get_coro().close()
            loop._ready.clear()  # type: ignore[attr-defined]
            loop._scheduled.clear()  # type: ignore[attr-defined]
            loop.close()
        self.loops.clear()
        self.graveyard.clear()

    def run(self, coro: Any, loop: SimLoop, limit: float = 600.0) -> Any:
        """Run `coro` on `loop` to its end (or fail after `limit` simulated seconds)."""
        task = loop.create_task(coro)
        end = self.now + limit
        while not task.done() and self.now < end:
            self.run_until(min(end, self.now + 0.05))
        if not task.done():
            raise TimeoutError(f"{coro!r} did not finish in {limit} simulated seconds")
        return task.result()
