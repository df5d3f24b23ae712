"""The I/O gate against a real (in-process) NBD storage server: what storage has seen when
the gate answers QEMU. A FLUSH or FUA write the running guest sends while the gate holds
is answered only once it and everything held before it are on storage and flushed."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from twinvol.nbd.aio import NbdServerProtocol
from twinvol.nbd.aio_client import NbdClient, NbdError
from twinvol.nbd.aio_group import close_all
from twinvol.nbd.constants import Err
from twinvol.nbd.server_events import ExportInfo
from twinvol.vm.gateio import GateServer

SIZE = 1 << 20
FUA = 1


class LogStore:
    """A memory volume that logs what reached it: ("W", offset) and ("F",)."""

    def __init__(self) -> None:
        self.buf = bytearray(SIZE)
        self.log: list[tuple[object, ...]] = []
        self.fail_writes = False

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_writes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.buf[offset:offset + len(data)] = data
        self.log.append(("W", offset))

    def trim(self, offset: int, length: int) -> None:
        self.buf[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None:
        self.buf[offset:offset + length] = bytes(length)

    def flush(self) -> None:
        self.log.append(("F",))

    def cache(self, offset: int, length: int) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]


class Storage:
    """One export "d" over a `LogStore` (an ExportRegistry)."""

    def __init__(self) -> None:
        self.store = LogStore()
        self.export = ExportInfo("d", SIZE)
        self.connections: dict[NbdServerProtocol, None] = {}
        self.executor = ThreadPoolExecutor(1)

    def lookup(self, name: str) -> ExportInfo | None:
        return self.export if name == "d" else None

    def list_exports(self) -> list[ExportInfo]:
        return [self.export]

    def attach(self, export: ExportInfo) -> LogStore:
        return self.store

    def detach(self, export: ExportInfo) -> None:
        pass


def with_gate(test: Callable[[Storage, GateServer, NbdClient], Awaitable[None]]) -> None:
    async def main() -> None:
        storage = Storage()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: NbdServerProtocol(storage, storage.executor, storage.connections),
            "127.0.0.1", 0)
        gate = GateServer("vm/disk0", "127.0.0.1", server.sockets[0].getsockname()[1], "d")
        await gate.start()
        qemu = await NbdClient.connect("127.0.0.1", gate.port, "d")
        try:
            await asyncio.wait_for(test(storage, gate, qemu), 20)
        finally:
            await qemu.aclose()
            await gate.close()
            server.close()
            close_all(storage.connections)
            storage.executor.shutdown(wait=False)

    asyncio.run(main())


def test_a_guest_flush_while_holding_is_answered_once_durable_on_storage() -> None:
    async def test(storage: Storage, gate: GateServer, qemu: NbdClient) -> None:
        log = storage.store.log
        gate.gate.hold()
        await qemu.pwrite(0, b"a" * 4096)          # held and acknowledged at once
        assert log == []
        await qemu.flush_cmd()                     # the guest runs: made durable first
        assert log == [("W", 0), ("F",)]
        await qemu.pwrite(8192, b"b" * 4096)       # held after the flush: stays held
        assert log == [("W", 0), ("F",)] and [op.offset for op in gate.gate.held] == [8192]
        assert await qemu.pread(8192, 4096) == b"b" * 4096  # reads see the held write
        await qemu.pwrite(4096, b"c" * 4096, FUA)  # a FUA write: the same
        # (the FUA write keeps its flag on storage, then the queue's closing flush)
        assert log == [("W", 0), ("F",), ("W", 8192), ("W", 4096), ("F",), ("F",)]
        assert gate.gate.held == []
        assert bytes(storage.store.buf[:12288]) == b"a" * 4096 + b"c" * 4096 + b"b" * 4096
        # Once QEMU stopped the VM its own flush is acknowledged from the queue: the
        # handover applies (and flushes) the queue before anything can read it.
        gate.gate.stopped = True
        await qemu.pwrite(0, b"d" * 4096)
        await qemu.flush_cmd()
        assert len(log) == 6 and [op.offset for op in gate.gate.held] == [0, 0]
        await gate.settle()
        assert await gate.release() == 2
        assert log[6:] == [("W", 0), ("F",)]

    with_gate(test)


def test_a_guest_flush_fails_when_storage_fails_and_the_queue_stays() -> None:
    async def test(storage: Storage, gate: GateServer, qemu: NbdClient) -> None:
        gate.gate.hold()
        await qemu.pwrite(0, b"x" * 4096)
        storage.store.fail_writes = True
        with pytest.raises(NbdError) as e:
            await qemu.flush_cmd()
        assert e.value.errno == Err.EIO and "held request 1" in e.value.message
        assert [op.seq for op in gate.gate.held] == [1, 2]  # for the handover or release
        storage.store.fail_writes = False
        assert await gate.release() == 2
        assert storage.store.log == [("W", 0), ("F",)]
        assert await qemu.pread(0, 4096) == b"x" * 4096

    with_gate(test)
