"""The mirrored write path of active-active pairs.

The primary orders writes: a host write at the primary is applied locally and sent to
the secondary on the (ordered) peer link in the same loop step, so both copies apply
overlapping writes in the same order; a host write at the secondary is forwarded to
the primary and acknowledged when the primary's mirrored write completed on both. The
common case (mirrored, activity-log extent already set, no FUA) completes through
callbacks with no Future or Task (`fast_write`); everything else takes `slow_write`.
A write that reaches only this copy is acknowledged only once the partner is fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from functools import partial
from typing import Any

from twinvol import clock
from twinvol.nbd.constants import Cmd, Err
from twinvol.replication import data_messages as dm
from twinvol.replication.backend import AsyncWriteBackend
from twinvol.replication.bitmap import AL_EXTENT, chunks_of
from twinvol.replication.leases import Leases
from twinvol.replication.partners import Partners
from twinvol.replication.peer import Done, Later, Message, PeerDown, RemoteError
from twinvol.replication.ports import JournalFeedPort, ManagerPort
from twinvol.replication.runtime import PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.backing import NotFast

log = logging.getLogger("twinvol.replication")


def _exc_of(f: asyncio.Future[Any]) -> BaseException | None:
    return asyncio.CancelledError() if f.cancelled() else f.exception()


def _settle(later: Later, f: asyncio.Future[Message]) -> None:
    exc = _exc_of(f)
    later.done(f.result() if exc is None else exc)


class WriteFailed(Exception):
    """A replicated write could not be completed; `errno` is the NBD error to return."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class ReplicatedBackend(AsyncWriteBackend):
    """What NBD connections of a paired volume use: reads local, writes replicated."""

    def __init__(self, writes: WritePath, pr: PairRuntime) -> None:
        super().__init__(pr.vol.store)
        self.writes = writes
        self.pr = pr

    def flush(self) -> None:
        self.pr.vol.store.flush()

    def submit(self, cmd: int, offset: int, length: int, data: Payload | None,
               flags: int) -> Awaitable[None]:
        if cmd == Cmd.FLUSH:
            return self.writes.host_flush(self.pr)
        return self.writes.host_write(self.pr, cmd, offset, length, data, flags)

    def start(self, cmd: int, offset: int, length: int, data: Payload | None, flags: int,
              done: Done) -> None:
        """`submit` for the NBD layer, completing through `done`: a mirrored write costs
        no Future or Task."""
        w = self.writes
        if cmd != Cmd.FLUSH and w.fast_write(self.pr, cmd, offset, length, data, flags,
                                                done):
            return
        fut = asyncio.ensure_future(w.host_flush(self.pr) if cmd == Cmd.FLUSH else
                                    w.slow_write(self.pr, cmd, offset, length, data, flags))
        fut.add_done_callback(lambda f: done(_exc_of(f)))


class WritePath:
    def __init__(self, mgr: ManagerPort, remote: JournalFeedPort, partners: Partners,
                 leases: Leases) -> None:
        self.mgr = mgr
        self.leases = leases       # a write reaching this copy alone waits out the partner's
        self.remote = remote       # a far copy fed from these writes journals them
        self.partners = partners   # a write the partner did not get starts a decision

    def host_write(self, pr: PairRuntime, cmd: int, offset: int, length: int,
                   data: Payload | None, flags: int) -> Awaitable[None]:
        """Start a host write; the common mirrored case completes without a Task."""
        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None) -> None:
            if exc is None:
                result.set_result(None)
            else:
                result.set_exception(exc)

        if self.fast_write(pr, cmd, offset, length, data, flags, done):
            return result
        return self.slow_write(pr, cmd, offset, length, data, flags)

    def fast_write(self, pr: PairRuntime, cmd: int, offset: int, length: int,
                    data: Payload | None, flags: int, done: Done, fwd: int = 0) -> bool:
        """Mirrored write with nothing to wait for but the partner: apply, send, and call
        `done(None)` or `done(exc)` from the partner's reply, with no Future or Task.

        Returns False (nothing done) when the general path is needed (AL update pending,
        FUA, no link, copy running, not mirrored). `fwd` is the partner's request id of
        a write it forwarded to us, whose payload it holds: the mirrored write then
        refers to it instead of sending it back."""
        rec = pr.rec
        if rec.io_mode != "mirror" or flags & 1:
            return False
        link = self.mgr.peers.links.get(rec.partner)
        if link is None or link.closed or not link.authed:
            return False
        if rec.role == "secondary":
            holding = data if cmd == Cmd.WRITE and data else None
            held = link.held

            def fw_done(exc: BaseException | None) -> None:
                if holding is not None:
                    held.pop(rid, None)
                if exc is None:
                    done(None)
                elif isinstance(exc, RemoteError):
                    done(WriteFailed(int(exc.code) if exc.code.isdigit() else Err.EIO, str(exc)))
                else:
                    done(WriteFailed(Err.EIO, f"partner lost: {exc}"))

            # hold=1: the primary may refer to the data instead of echoing it.
            try:
                rid = link.request_row("fwb", rec.name,
                                       [cmd, offset, length, flags, int(holding is not None)],
                                       data or b"", fw_done)
            except PeerDown:
                return False  # the link is closing: the general path decides
            if holding is not None:
                held[rid] = holding
            return True
        al = pr.al
        if not al.durable:
            return False
        exts = chunks_of(offset, length, AL_EXTENT)
        bits = al.bits
        for x in exts:
            if not bits[x >> 3] & (1 << (x & 7)):  # extent not (yet) in the activity log
                return False
        try:
            self.mgr.apply(pr, cmd, offset, length, data, flags)
        except (OSError, NotFast) as e:
            done(e)  # this copy is unchanged: the partner is not asked either
            return True
        inflight = pr.al_inflight
        for x in exts:
            inflight[x] = inflight.get(x, 0) + 1
        payload = data or b""
        if fwd and payload:
            payload = b""
        else:
            fwd = 0
        seq = j = 0
        if self.remote.feeds:
            seq = self.remote.on_applied(rec.volume, cmd, offset, length, data, flags,
                                         committed=False)
        else:
            j = -1  # no sequence number (a "w" frame without "j")

        def w_done(exc: BaseException | None) -> None:
            if exc is None:
                if seq:
                    self.remote.commit(rec.volume, seq)
            else:
                # Mark the chunks before the write leaves the activity log's in-flight
                # count: a meeting with the partner that runs before the task below must
                # still see them (it sends in-flight extents and dirty bits).
                pr.dirty.set_many(chunks_of(offset, length))
            now = clock.monotonic()
            for x in exts:
                inflight[x] -= 1
                pr.al_last[x] = now
            if exc is None:
                done(None)
                return
            # The write reached only this copy: the general path records it and decides.
            task = asyncio.ensure_future(self.partner_missing(pr, chunks_of(offset, length)))

            def decided(t: asyncio.Future[None]) -> None:
                failed = _exc_of(t)
                self.remote.settle(rec.volume, seq, failed is None)
                done(failed)

            task.add_done_callback(decided)

        try:
            link.request_row("wb", rec.name, [cmd, offset, length, flags, fwd, j or seq],
                             payload, w_done)
        except PeerDown as e:
            # The link is closing: this copy has the write, the partner may not. Never
            # raise here: the sequence number would stay in flight and stop the far copy.
            w_done(e)
        return True

    async def slow_write(self, pr: PairRuntime, cmd: int, offset: int, length: int,
                          data: Payload | None, flags: int) -> None:
        rec = pr.rec
        if rec.io_mode == "block":
            raise WriteFailed(Err.EIO,
                              f"volume {rec.volume} is blocked on node {self.mgr.node.name}")
        if rec.role == "secondary" and rec.io_mode == "mirror":
            link = self.mgr.link_or_none(rec.partner)
            if link is None:
                self.partners.partner_lost(pr, "partner unreachable")
                raise WriteFailed(Err.EIO, "partner unreachable: this copy is blocked")
            try:
                await link.request(dm.encode(dm.Forward(rec.name, cmd=cmd, off=offset,
                                                        length=length, flags=flags)),
                                   data or b"")
            except RemoteError as e:
                raise WriteFailed(int(e.code) if e.code.isdigit() else Err.EIO, str(e)) from None
            except PeerDown as e:
                raise WriteFailed(Err.EIO, f"partner lost during the write: {e}") from None
            return
        await self.primary_write(pr, cmd, offset, length, data, flags)

    async def primary_write(self, pr: PairRuntime, cmd: int, offset: int, length: int,
                             data: Payload | None, flags: int) -> None:
        rec = pr.rec
        ex = self.mgr.node.executor
        chunks = chunks_of(offset, length)
        exts = chunks_of(offset, length, AL_EXTENT)
        # Mirrored writes are covered by the activity log, lone writes by the dirty
        # bitmap; either way the bit is durable before the data is written. Whether
        # the write is replicated is decided again after each wait, in the same loop
        # step as the write itself: a copy that started or ended meanwhile must not
        # read the chunk, send it and clear its bit while this write lands here only.
        covered: set[bool] = set()
        while (replicate := self.replicating(pr)) not in covered:
            bits, idx = (pr.al, exts) if replicate else (pr.dirty, chunks)
            bits.set_many(idx)
            await bits.sync(ex)
            covered.add(replicate)
            if rec.io_mode == "block":
                raise WriteFailed(Err.EIO, f"volume {rec.volume} was blocked")
        if not replicate and pr.copy_task is not None and not pr.copy_task.done():
            pr.recopy.update(chunks)  # the running copy may have sent the chunk already
        self.mgr.apply(pr, cmd, offset, length, data, flags)
        seq = self.remote.on_applied(rec.volume, cmd, offset, length, data, flags,
                                     committed=False) if self.remote.feeds else 0
        try:
            await self.replicate(pr, cmd, offset, length, data, flags, replicate, seq)
        except BaseException:
            self.remote.settle(rec.volume, seq, False)
            raise
        self.remote.commit(rec.volume, seq)

    def replicating(self, pr: PairRuntime) -> bool:
        """Does a primary write go to the partner now (mirrored, or a copy we feed)?"""
        rec = pr.rec
        return rec.io_mode == "mirror" or (rec.copy_source == self.mgr.node.name
                                           and self.mgr.peers.is_up(rec.partner)
                                           and pr.copy_task is not None
                                           and not pr.copy_task.done())

    async def replicate(self, pr: PairRuntime, cmd: int, offset: int, length: int,
                         data: Payload | None, flags: int, replicate: bool,
                         seq: int) -> None:
        """Second half of a primary write: the partner's copy, FUA, partner loss."""
        rec = pr.rec
        ex = self.mgr.node.executor
        chunks = chunks_of(offset, length)
        exts = chunks_of(offset, length, AL_EXTENT)
        fut = None
        if replicate and rec.io_mode != "block":
            link = self.mgr.link_or_none(rec.partner)
            if link is not None:
                for x in exts:
                    pr.al_inflight[x] = pr.al_inflight.get(x, 0) + 1
                header = dm.encode(dm.Write(rec.name, cmd=cmd, off=offset, length=length,
                                            flags=flags, j=seq or dm.NONE))
                try:
                    fut = link.request(header, data or b"")
                except PeerDown:  # closing: as if the partner were lost during the write
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(PeerDown("link closing"))
            else:
                await self.partner_missing(pr, chunks)
        local_sync = None
        if flags & 1:  # FUA
            local_sync = asyncio.get_running_loop().run_in_executor(ex, pr.vol.store.flush)
        try:
            if fut is not None:
                try:
                    await fut
                except PeerDown:
                    await self.partner_missing(pr, chunks)
                except RemoteError as e:
                    log.error("partner failed a mirrored write",
                              extra={"pair": rec.name, "error": str(e)})
                    await self.partner_missing(pr, chunks)
        finally:
            if fut is not None:
                now = clock.monotonic()
                for x in exts:
                    pr.al_inflight[x] -= 1
                    pr.al_last[x] = now
        if not replicate and not rec.remote \
                and not pr.lease.may_act_alone(clock.monotonic()):
            # Acknowledged by this copy alone: only once no lease granted to the partner
            # is left (a resync that just ended may have granted one).
            await self.leases.fence_partner(pr)
        if local_sync is not None:
            await local_sync

    async def partner_missing(self, pr: PairRuntime, chunks: range) -> None:
        """A write reached only this copy: record it, then continue only if allowed."""
        pr.dirty.set_many(chunks)
        await pr.dirty.sync(self.mgr.node.executor)
        self.partners.partner_lost(pr, "partner lost during a mirrored write")
        if pr.decide_task is not None:
            await asyncio.shield(pr.decide_task)
        if pr.rec.io_mode != "local":
            raise WriteFailed(Err.EIO, f"partner lost and this copy may not continue: "
                                       f"{pr.rec.reason}")
        if not pr.rec.remote and not pr.lease.may_act_alone(clock.monotonic()):
            await self.leases.fence_partner(pr)

    async def host_flush(self, pr: PairRuntime) -> None:
        ex = self.mgr.node.executor
        local = asyncio.get_running_loop().run_in_executor(ex, pr.vol.store.flush)
        feed = self.remote.feeds.get(pr.rec.volume)
        if feed is not None:
            await asyncio.get_running_loop().run_in_executor(ex, feed.journal.sync)
        link = self.mgr.link_or_none(pr.rec.partner) if pr.rec.io_mode == "mirror" else None
        if link is not None:
            with contextlib.suppress(PeerDown):
                await link.request(dm.encode(dm.Flush(pr.rec.name)))
        await local

    def on_forwarded(self, pr: PairRuntime, cmd: int, off: int, n: int, flags: int,
                     payload: Payload, fwd: int = 0) -> Later | Awaitable[Message]:
        """A write the secondary forwarded: ordered and mirrored here like a host write.
        `fwd`: its request id, when the secondary keeps the data (the mirrored write
        then refers to it)."""
        held = self.mgr.holds.get(pr.rec.volume)
        if held is not None:
            # This copy is not the latest (a far copy took over) or may not be: a write
            # acknowledged now would be rolled back by the failback.
            raise RemoteError(f"volume {pr.rec.volume} on node {self.mgr.node.name} is "
                              f"held: {held}", str(Err.EIO))
        if pr.rec.role == "primary":
            later = Later()

            def done(exc: BaseException | None) -> None:
                if exc is None:
                    later.done(({}, b""))
                elif isinstance(exc, WriteFailed):
                    later.done(RemoteError(str(exc), str(exc.errno)))
                elif isinstance(exc, OSError):
                    later.done(RemoteError(f"write failed: {exc}", str(Err.EIO)))
                elif isinstance(exc, NotFast):
                    later.done(RemoteError(str(exc), str(Err.ENOTSUP)))
                else:
                    later.done(exc)

            if self.fast_write(pr, cmd, off, n, payload, flags, done, fwd=fwd):
                return later
        return self.forwarded_slow(pr, cmd, off, n, flags, payload)

    def on_forwarded_batch(self, pr: PairRuntime, msg: dm.ForwardBatch, payload: Payload
                           ) -> list[BaseException | Later | None]:
        """Writes the secondary forwarded in one step (`fwb`, rows `dm.ForwardRow`), a
        WRITE's data next in the payload: each is ordered and mirrored like a host write
        here and answered when complete."""
        out: list[BaseException | Later | None] = []
        view = memoryview(payload)
        pos = 0
        for r in msg.rows:
            cmd, n = r.cmd, r.n
            data: Payload = b""
            if cmd == Cmd.WRITE:
                data = view[pos:pos + n]
                pos += n
                if len(data) != n:
                    out.append(RemoteError("batch payload is shorter than its writes",
                                           "invalid"))
                    continue
            try:
                res = self.on_forwarded(pr, cmd, r.off, n, r.flags, data,
                                        fwd=r.rid if r.hold else 0)
            except RemoteError as e:
                out.append(e)
                continue
            if not isinstance(res, Later):
                later = Later()
                task = asyncio.ensure_future(res)
                task.add_done_callback(partial(_settle, later))
                res = later
            out.append(res)
        return out

    async def forwarded_slow(self, pr: PairRuntime, cmd: int, off: int, n: int, flags: int,
                             payload: Payload) -> Message:
        try:
            await self.primary_write(pr, cmd, off, n, payload, flags)
        except WriteFailed as e:
            raise RemoteError(str(e), str(e.errno)) from None
        return {}, b""
