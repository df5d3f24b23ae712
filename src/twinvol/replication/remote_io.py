"""Host I/O on the volumes of a remote copy's group, where no active-active pair carries
it: the primary of an async pair journals each write (and, in sync mode, waits for the
far site); a far copy that was taken over marks what changes, so failback copies only
that."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from twinvol.nbd.constants import Cmd
from twinvol.replication.backend import AsyncWriteBackend
from twinvol.replication.bitmap import chunks_of
from twinvol.replication.runtime import PairRuntime
from twinvol.replication.wire import Payload

if TYPE_CHECKING:
    from twinvol.replication.remote import RemoteCopy


class TakeoverBackend(AsyncWriteBackend):
    """Host I/O on a far-site copy that was taken over: every changed chunk is marked
    (durably, before the write) so failback copies only what changed."""

    def __init__(self, remote: RemoteCopy, pr: PairRuntime) -> None:
        super().__init__(pr.vol.store)
        self.remote = remote
        self.pr = pr
        self.flush = pr.vol.store.flush

    async def submit(self, cmd: int, offset: int, length: int, data: Payload | None,
                     flags: int) -> None:
        pr, ex = self.pr, self.remote.node.executor
        loop = asyncio.get_running_loop()
        if cmd == Cmd.FLUSH:
            await loop.run_in_executor(ex, pr.vol.store.flush)
            return
        if pr.dirty.set_many(chunks_of(offset, length)):
            await pr.dirty.sync(ex)
        self.remote.mgr.apply(pr, cmd, offset, length, data, flags)
        if flags & 1:
            await loop.run_in_executor(ex, pr.vol.store.flush)


class JournalingBackend(TakeoverBackend):
    """Host I/O on the primary of an async pair that has no active-active partner."""

    def submit(self, cmd: int, offset: int, length: int,  # type: ignore[override]
               data: Payload | None, flags: int) -> Awaitable[None]:
        if cmd == Cmd.FLUSH or flags & 1:
            return self._durable(cmd, offset, length, data, flags)
        # The common case completes in this step: no task per write.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self.remote.mgr.apply(self.pr, cmd, offset, length, data, flags)
            seq = self.remote.on_applied(self.pr.rec.volume, cmd, offset, length, data, flags,
                                         committed=True)
        except Exception as e:
            fut.set_exception(e)
            return fut
        waiting = self.remote.wait_sync(self.pr.rec.volume, seq)
        if waiting is not None:
            return waiting
        fut.set_result(None)
        return fut

    async def _durable(self, cmd: int, offset: int, length: int,
                       data: Payload | None, flags: int) -> None:
        pr, ex = self.pr, self.remote.node.executor
        loop = asyncio.get_running_loop()
        if cmd == Cmd.FLUSH:
            await loop.run_in_executor(ex, self._flush_all)
            return
        self.remote.mgr.apply(pr, cmd, offset, length, data, flags)
        seq = self.remote.on_applied(pr.rec.volume, cmd, offset, length, data, flags,
                                     committed=True)
        waiting = self.remote.wait_sync(pr.rec.volume, seq)
        if flags & 1:
            await loop.run_in_executor(ex, self._flush_all)
        if waiting is not None:
            await waiting

    def _flush_all(self) -> None:
        self.pr.vol.store.flush()
        g = self.remote.feeds.get(self.pr.rec.volume)
        if g is not None:
            g.journal.sync()
