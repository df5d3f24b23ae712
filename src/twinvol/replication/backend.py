"""The common shape of backends whose host writes complete asynchronously.

A replicated, journaled or switched volume reads straight from a backing store but
sends every write through `submit` (an awaitable the NBD layer replies on). The
synchronous write methods exist only to satisfy the NBD Backend protocol.
"""

from __future__ import annotations

from twinvol.nbd.aio import Backend
from twinvol.nbd.constants import Cmd
from twinvol.storage.backing import BackingStore


class AsyncWriteBackend:
    async_writes = True

    def __init__(self, store: BackingStore) -> None:
        self.pread = store.pread
        self.cache = store.cache
        self.extents = store.extents

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError("writes go through submit()")

    def trim(self, offset: int, length: int) -> None:
        raise NotImplementedError("trims go through submit()")

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None:
        raise NotImplementedError("zeroes go through submit()")


def apply_write(store: Backend, cmd: int, offset: int, length: int,
                data: bytes | bytearray | memoryview | None, flags: int) -> None:
    """Apply a WRITE, TRIM or WRITE_ZEROES (NBD flags: 2 no hole, 16 fast zero) to `store`;
    other commands change nothing. FUA and FLUSH are the caller's (they wait)."""
    if cmd == Cmd.WRITE:
        assert data is not None
        store.pwrite(offset, data)
    elif cmd == Cmd.TRIM:
        store.trim(offset, length)
    elif cmd == Cmd.WRITE_ZEROES:
        store.write_zeroes(offset, length, no_hole=bool(flags & 2), fast=bool(flags & 16))
