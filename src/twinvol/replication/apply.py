"""The partner's side of mirrored writes: what a copy does with the writes, copy chunks
and flushes its partner sends (the primary's side is `writes.py`).

Each write is applied in the order it arrived on the ordered peer link. What this
machine's disk may lose in a power loss is covered by the primary's activity log (its
extents leave it only after a flush here too), copied here when the copies meet again
after this machine restarted (`activity.py`, `partners.reconcile`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from twinvol.nbd.constants import Cmd
from twinvol.replication import data_messages as dm
from twinvol.replication.bitmap import chunks_of
from twinvol.replication.peer import Later, Message, RemoteError
from twinvol.replication.ports import JournalFeedPort, ManagerPort
from twinvol.replication.runtime import PairRuntime
from twinvol.replication.wire import Payload


class PartnerApply:
    def __init__(self, mgr: ManagerPort, remote: JournalFeedPort) -> None:
        self.mgr = mgr
        self.remote = remote

    def on_writes(self, pr: PairRuntime, peer: str, msg: dm.WriteBatch, payload: Payload
                  ) -> list[BaseException | Later | None]:
        """A batch of mirrored writes (`wb`), applied in order: one outcome per row
        (`dm.WriteRow`). FUA never comes batched."""
        out: list[BaseException | Later | None] = []
        view = memoryview(payload)
        pos = 0
        size = pr.vol.record.size
        volume = pr.rec.volume
        held = None
        feeds = self.remote.feeds
        for row in msg.rows:
            cmd, off, n, flags, fwd, j = row.cmd, row.off, row.n, row.flags, row.fwd, row.j
            data: Payload | None = None
            try:
                if cmd == Cmd.WRITE:
                    if fwd:
                        if held is None:
                            link = self.mgr.peers.links.get(peer)
                            held = {} if link is None else link.held
                        data = held.pop(fwd, None)
                        if data is None or len(data) != n:
                            raise RemoteError(f"mirrored write refers to forwarded write {fwd}, "
                                              "whose data this node does not hold", "invalid")
                    else:
                        data = view[pos:pos + n]
                        pos += n
                        if len(data) != n:
                            raise RemoteError("batch payload is shorter than its writes",
                                              "invalid")
                if off + n > size:
                    raise RemoteError(f"write [{off}, +{n}) outside volume {volume}", "invalid")
                if flags & 1:
                    raise RemoteError("a FUA write cannot be batched", "invalid")
                self.mgr.apply(pr, cmd, off, n, data, flags)
                if feeds:
                    if j >= 0:
                        self.remote.on_standby_write(volume, j, cmd, off, n, data, flags)
                    else:
                        self.remote.on_applied(volume, cmd, off, n, data, flags,
                                               committed=True)
                out.append(None)
            except Exception as e:  # this row fails; the others stand
                out.append(e if isinstance(e, RemoteError) else
                           RemoteError(f"{type(e).__name__}: {e}", "internal"))
        return out

    def inside(self, pr: PairRuntime, off: int, n: int) -> None:
        if off + n > pr.vol.record.size:
            raise RemoteError(f"write [{off}, +{n}) outside volume {pr.rec.volume}", "invalid")

    def on_copy(self, pr: PairRuntime, peer: str, msg: dm.Copy, payload: Payload) -> Message:
        """A chunk of a copy (initial copy, resync, catch-up) from the copy source."""
        off, n = msg.off, msg.length
        self.inside(pr, off, n)
        if pr.rec.remote and pr.rec.role == "secondary":
            self.remote.check_feeder(pr, peer, chunks_of(off, n))
        if msg.zero:
            pr.vol.store.write_zeroes(off, n, no_hole=False, fast=False)
        elif len(payload) != n:
            raise RemoteError(f"copy chunk at {off} carries {len(payload)} bytes, not {n}",
                              "invalid")
        else:
            pr.vol.store.pwrite(off, payload)
        if self.remote.feeds:
            self.remote.on_copied(pr.rec.volume, off, n, msg.j)
        return {}, b""

    def on_write(self, pr: PairRuntime, peer: str, msg: dm.Write, payload: Payload
                 ) -> Message | Awaitable[Message]:
        """A mirrored write in a frame of its own (FUA, or the general path)."""
        off, n, cmd, flags = msg.off, msg.length, msg.cmd, msg.flags
        self.inside(pr, off, n)
        if msg.fwd:
            # Our own forwarded write, ordered by the primary: we kept its data.
            link = self.mgr.peers.links.get(peer)
            held = None if link is None else link.held.pop(msg.fwd, None)
            if held is None or len(held) != n:
                raise RemoteError(f"mirrored write refers to forwarded write {msg.fwd}, "
                                  "whose data this node does not hold", "invalid")
            payload = held
        self.mgr.apply(pr, cmd, off, n, payload, flags)
        if self.remote.feeds:
            if msg.j != dm.NONE:
                self.remote.on_standby_write(pr.rec.volume, msg.j, cmd, off, n, payload,
                                             flags)
            else:
                self.remote.on_applied(pr.rec.volume, cmd, off, n, payload, flags,
                                       committed=True)
        if flags & 1:
            return self.sync_reply(pr)
        return {}, b""

    async def sync_reply(self, pr: PairRuntime) -> Message:
        await asyncio.get_running_loop().run_in_executor(self.mgr.node.executor, pr.vol.store.flush)
        return {}, b""

    async def on_flush(self, pr: PairRuntime) -> Message:
        return await self.sync_reply(pr)
