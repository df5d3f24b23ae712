"""The I/O gate's asyncio layer: an NBD server on loopback for QEMU (the sans-IO
`ServerConnection`) and an NBD client to the host's storage path (`NbdClient`), with
the `Gate` policy deciding, request by request, what reaches storage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from twinvol.nbd.aio_client import ConnectionLost, NbdClient, NegotiationError
from twinvol.nbd.client_events import Completed
from twinvol.nbd.constants import NEED_DATA, Cmd, Err
from twinvol.nbd.server import ServerConnection
from twinvol.nbd.server_events import Disconnect, ExportInfo, Ready, Request
from twinvol.vm.gate import Action, Gate, GateMode, HeldOp

log = logging.getLogger("twinvol.vm.gate")

_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FLUSH = int(Cmd.FLUSH)
RECONNECT_FOR = 15.0  # seconds a lost storage path is retried before requests fail


class GateError(Exception):
    """The storage path cannot be reached or refused a held request."""


@dataclass(slots=True)
class _Parked:
    conn: GateConnection
    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | None
    held: list[HeldOp] | None = None  # a read: the held requests when it was sent


class _Exports:
    def __init__(self, info: ExportInfo) -> None:
        self.info = info

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name in (self.info.name, "") else None

    def list_exports(self) -> list[ExportInfo]:
        return [self.info]


class GateConnection(asyncio.Protocol):
    """One QEMU connection to a gate."""

    def __init__(self, server: GateServer) -> None:
        self.server = server
        self.conn = ServerConnection(server.exports)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.send([self.conn.data_to_send()])

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        return False

    def send(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(chunks)

    def _pump(self) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            out = conn.data_to_send()
            if out:
                self.send([out])
            if ev is NEED_DATA:
                return
            if type(ev) is Request:
                data = None if ev.data is None else bytes(ev.data)
                self.server.handle(_Parked(self, int(ev.command), ev.flags, ev.cookie,
                                           ev.offset, ev.length, data))
            elif type(ev) is Ready:
                log.info("qemu connected to gate", extra={"gate": self.server.name})
            elif type(ev) is Disconnect:
                if self.transport is not None:
                    if ev.error:
                        self.transport.abort()
                    else:
                        self.transport.close()
                return


class GateServer:
    """The gate of one disk of one VM."""

    def __init__(self, name: str, host: str, port: int, export: str,
                 mode: GateMode = GateMode.OPEN) -> None:
        self.name = name
        self.upstream_addr = (host, port)
        self.export = export
        self.gate = Gate(mode)
        self.client: NbdClient | None = None
        self.exports = _Exports(ExportInfo(export, 0))
        self.connections: set[GateConnection] = set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._waiting: list[_Parked] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._unsent: list[_Parked] = []
        self._closed = False
        # FLUSH / FUA requests held while the guest runs: (seq, request), answered once
        # the queue through seq is on storage (see `_drain`).
        self._syncs: list[tuple[int, _Parked]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()  # one `apply` at a time: held order is global

    async def start(self) -> None:
        """Connect to storage (raises NegotiationError/ConnectionLost/OSError when the
        export is not there), then listen for QEMU on a loopback port."""
        self.client = await self._connect()
        info = self.client.info
        assert info is not None
        self.exports.info = ExportInfo(self.export, info.size, info.description,
                                       read_only=self.client.read_only)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GateConnection(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _connect(self) -> NbdClient:
        host, port = self.upstream_addr
        return await NbdClient.connect(host, port, self.export, meta_context=True, timeout=10)

    @property
    def size(self) -> int:
        return self.exports.info.size

    # ---- requests from QEMU -------------------------------------------------

    def handle(self, req: _Parked) -> None:
        gate = self.gate
        action = gate.admit(req.command, req.flags, req.offset, req.length, req.data)
        if action is Action.ACK:
            req.conn.send([req.conn.conn.reply_ok(req.cookie)])
        elif action is Action.SYNC:
            self._syncs.append((gate.held[-1].seq, req))
            if self._drain_task is None or self._drain_task.done():
                self._drain_task = asyncio.ensure_future(self._drain())
        elif action is Action.WAIT:
            self._waiting.append(req)
        else:
            if gate.held and req.command in (_READ, _BLOCK_STATUS):
                req.held = gate.take_snapshot()
            self._forward(req)

    def _forward(self, req: _Parked) -> None:
        client = self.client
        if client is None or not client.alive:
            self._unsent.append(req)
            self._reconnect()
            return

        def done(res: Completed | BaseException) -> None:
            self._reply(req, res)

        client.submit(req.command, req.offset, req.length, req.flags, req.data, done)

    def _reply(self, req: _Parked, res: Completed | BaseException) -> None:
        sc = req.conn.conn
        if isinstance(res, BaseException):
            if isinstance(res, ConnectionLost) and not self._closed:
                self._unsent.append(req)  # not answered: send it again on a new connection
                self._reconnect()
                return
            req.conn.send(sc.reply_error(req.cookie, Err.EIO, f"storage path: {res}"))
            return
        if res.error:
            req.conn.send(sc.reply_error(req.cookie, res.error, res.message))
            return
        gate = self.gate
        held = gate.held if req.held is None else gate.held_since(req.held)
        if req.command == _READ:
            data = res.data
            if held and gate.overlaps_held(req.offset, req.length, held):
                buf = data if data is not None else bytearray(req.length)
                gate.overlay(req.offset, buf, held)
                data = buf
            if data is None:
                req.conn.send([sc.reply_read_hole(req.cookie, req.offset, req.length)])
            else:
                req.conn.send(sc.reply_read(req.cookie, req.offset, data))
        elif req.command == _BLOCK_STATUS:
            extents = res.extents or [(req.length, 0)]
            if held and gate.overlaps_held(req.offset, req.length, held):
                extents = [(req.length, 0)]  # held writes there: report plain data
            req.conn.send([sc.reply_block_status(req.cookie, extents)])
        else:
            req.conn.send([sc.reply_ok(req.cookie)])

    def _reconnect(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_FOR
        while not self._closed:
            try:
                self.client = await self._connect()
                log.info("gate reconnected to storage", extra={"gate": self.name})
                break
            except (OSError, ConnectionLost, TimeoutError, Exception) as e:
                if loop.time() > deadline:
                    log.error("gate lost its storage path", extra={"gate": self.name,
                                                                   "error": str(e)})
                    unsent, self._unsent = self._unsent, []
                    for req in unsent:
                        req.conn.send(req.conn.conn.reply_error(req.cookie, Err.EIO,
                                                                f"storage path lost: {e}"))
                    return
                await asyncio.sleep(0.2)
        unsent, self._unsent = self._unsent, []
        for req in unsent:
            self._forward(req)

    # ---- holding, releasing, replaying ------------------------------------------

    async def _call(self, op: HeldOp) -> None:
        """One held request to storage, waiting for its reply (sent again once on a new
        connection if the path dies meanwhile: a write applied twice in a row is the same
        write)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(2):
            client = self.client
            if client is None or not client.alive:
                try:
                    self.client = client = await self._connect()
                except (OSError, ConnectionLost, TimeoutError, NegotiationError) as e:
                    raise GateError(f"held request {op.seq}: storage path: {e}") from None
            fut: asyncio.Future[Completed | BaseException] = loop.create_future()

            def done(r: Completed | BaseException,
                     f: asyncio.Future[Completed | BaseException] = fut) -> None:
                if not f.done():
                    f.set_result(r)

            client.submit(op.command, op.offset, op.length, op.flags, op.data, done)
            res = await fut
            if isinstance(res, ConnectionLost):
                continue
            if isinstance(res, BaseException):
                raise GateError(f"held request {op.seq}: {res}")
            if res.error:
                raise GateError(f"held request {op.seq}: {res.message or res.error}")
            return
        raise GateError(f"held request {op.seq}: storage path lost")

    async def apply(self, ops: Iterable[HeldOp]) -> int:
        """Apply held requests not yet applied here, in order, then flush once.

        A request waits only for the earlier ones it overlaps, so independent writes go
        out together. Held flushes are met by the final flush: nobody reads this storage
        before `apply` returns (the VM is paused, the origin still keeps the queue until
        the destination confirms), so only the order of overlapping writes and the
        durability of all of them at the end matter."""
        async with self._apply_lock:
            return await self._apply(ops)

    async def _apply(self, ops: Iterable[HeldOp]) -> int:
        pending = self.gate.to_apply(ops)
        if not pending:
            return 0
        inflight: list[tuple[HeldOp, asyncio.Task[None]]] = []
        try:
            for op in pending:
                if op.command != _FLUSH:
                    deps = [t for o, t in inflight if o.offset < op.offset + op.length
                            and op.offset < o.offset + o.length]
                    if deps:
                        await asyncio.gather(*deps)
                    inflight.append((op, asyncio.ensure_future(self._call(op))))
            await asyncio.gather(*(t for _, t in inflight))
        finally:
            for _, t in inflight:
                t.cancel()
        await self._call(HeldOp(0, _FLUSH, 0, 0, 0))
        for op in pending:
            self.gate.applied(op)
        return len(pending)

    async def _drain(self) -> None:
        """Answer the FLUSH / FUA requests held while the guest runs: apply the queue
        through the newest of them (everything before it, in order, then a storage
        flush), then acknowledge each one that is now on storage. Requests held after it
        stay held. If storage fails, they get EIO and the queue stays for the handover
        or `release`."""
        while self._syncs and not self._closed:
            upto = self._syncs[-1][0]
            error = ""
            try:
                await self.apply([op for op in self.gate.take_snapshot() if op.seq <= upto])
            except GateError as e:
                error = str(e)
                log.error("gate could not make a flush durable",
                          extra={"gate": self.name, "error": error})
            done = [r for seq, r in self._syncs if seq <= upto]
            self._syncs = [(seq, r) for seq, r in self._syncs if seq > upto]
            for req in done:
                sc = req.conn.conn
                if error or self.gate.applied_seq < upto:
                    req.conn.send(sc.reply_error(req.cookie, Err.EIO,
                                                 f"storage path: {error or 'not applied'}"))
                else:
                    req.conn.send([sc.reply_ok(req.cookie)])

    async def settle(self) -> None:
        """Wait until no flush is being made durable here: the held queue is stable
        (for the handover snapshot)."""
        while self._drain_task is not None and not self._drain_task.done():
            await asyncio.wait([self._drain_task])
        async with self._apply_lock:
            pass

    async def release(self) -> int:
        """Origin after a failed switchover: apply what is held (and whatever arrives
        meanwhile), then forward again."""
        n = 0
        while self.gate.held:
            n += await self.apply(self.gate.take_snapshot())
        if self.gate.mode is GateMode.HOLDING:
            self.gate.open()
        return n

    async def replay(self, ops: Iterable[HeldOp]) -> int:
        """Destination: apply the origin's held requests, then let QEMU's requests through
        in the order they arrived."""
        n = await self.apply(ops)
        self.gate.open()
        waiting, self._waiting = self._waiting, []
        for req in waiting:
            self.handle(req)
        return n

    def status(self) -> dict[str, object]:
        return {**self.gate.status(), "port": self.port, "export": self.export,
                "storage": f"{self.upstream_addr[0]}:{self.upstream_addr[1]}",
                "waiting": len(self._waiting)}

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(BaseException):
                await self._drain_task
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnecting
        if self.client is not None:
            self.client.close()
