"""Asynchronous remote copy: journals per consistency group, shipping, ordered apply, DR.

Roles of a node in a consistency group (`GroupRecord.role`):
- `primary` feeds the far site: every write it applies to a volume of the group gets the
  next sequence number and a journal record; records are shipped to the target only once
  committed (for an active-active volume: once the partner has the write too), so the
  standby never lacks a record the target has.
- `standby` is the active-active partner of the primary: mirrored writes arrive with their
  sequence numbers and are journaled here too (the same numbers), so this node can feed
  the target if the primary is lost (delta resync). What it holds no record for (writes
  copied by a resync, a journal overflow) is marked in the pair's dirty bitmap instead.
- `secondary` is the far-site target: records are journaled on arrival (so a crash
  re-applies them locally, never leaving a half-applied batch) and applied in sequence
  order across every volume of the group, so its copy is always a crash-consistent point.

Copy-management information (sequence numbers written / sent / received / applied, with
the primary-site time of each) is kept in every participating node's catalog: the target
reports progress in its replies, the primary passes it on to the standby.

Here: the groups and the journaling write path. Beside it: shipping (`remote_ship`), the
standby (`remote_standby`), the target (`remote_target`), creation (`remote_setup`),
status (`remote_status`), host I/O without an active-active partner (`remote_io`), DR.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from twinvol import clock
from twinvol.nbd.constants import Cmd
from twinvol.replication import remote_messages as rm
from twinvol.replication.bitmap import chunks_of
from twinvol.replication.core import far
from twinvol.replication.core.types import GroupRole, GroupState, JournalMode
from twinvol.replication.dr import DisasterRecovery
from twinvol.replication.messages import BadMessage
from twinvol.replication.pairs import PairRecord
from twinvol.replication.peer import Message, RemoteError
from twinvol.replication.ports import ManagerPort
from twinvol.replication.remote_setup import RemoteSetup
from twinvol.replication.remote_ship import Shipper
from twinvol.replication.remote_standby import Standby
from twinvol.replication.remote_status import group_view
from twinvol.replication.remote_target import FarTarget, refetch_damaged
from twinvol.replication.runtime import GroupRecord, GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.journal import (
    Journal,
    JournalError,
    JournalFull,
)
from twinvol.storage.records import RecordTable

log = logging.getLogger("twinvol.remote")

CHECKPOINT_EVERY = 0.3     # seconds between durable apply checkpoints at the target



class RemoteCopy:
    """The async-copy side of a node's replication manager."""

    def __init__(self, mgr: ManagerPort) -> None:
        self.mgr = mgr
        self.node = mgr.node
        self.table = RecordTable(self.node.volumes.catalog.db, "groups", GroupRecord)
        self.dir = os.path.join(self.node.data_dir, "journals")
        self.groups: dict[str, GroupRuntime] = {}
        self.feeds: dict[str, GroupRuntime] = {}   # volume -> group it feeds (primary/standby)
        self.dr = DisasterRecovery(self)
        self.target = FarTarget(self)
        self.ship = Shipper(self)
        self.standby = Standby(self)
        self.setup = RemoteSetup(self)
        for rec in self.table.all():
            self.open_group(rec)

    # ---- records and lifecycle ----------------------------------------------------

    def open_group(self, rec: GroupRecord) -> GroupRuntime:
        journal = Journal(os.path.join(self.dir, rec.name), rec.journal_limit)
        g = GroupRuntime(rec, journal)
        self.groups[rec.name] = g
        # The record is saved now and then; the journal is the truth after a crash: a
        # sequence number it holds must never be handed out again.
        if rec.role == "primary":
            rec.written = max(rec.written, journal.last)
        elif rec.role == "standby":
            rec.seq_seen = max(rec.seq_seen, journal.last)
        if rec.role == "secondary" and (journal.corrupt_at is not None or journal.cut_tail):
            refetch_damaged(rec, journal)
        elif journal.corrupt_at is not None:
            rec.state = GroupState.SUSPENDED
            rec.reason = f"journal damaged at sequence {journal.corrupt_at}"
        return g

    def save(self, g: GroupRuntime) -> None:
        g.rec.updated = clock.wall()
        g.last_save = clock.monotonic()
        self.table.save(g.rec.name, g.rec)

    def attach(self, pr: PairRuntime) -> None:
        """An async pair record was loaded: link it to its group."""
        g = self.groups.get(pr.rec.group)
        if g is None:
            log.error("async pair without its group", extra={"pair": pr.rec.name})
            return
        g.pairs[pr.rec.name] = pr
        if g.rec.role in ("primary", "standby"):
            self.feeds[pr.rec.volume] = g

    def detach(self, pr: PairRuntime) -> None:
        g = self.groups.get(pr.rec.group)
        if g is None:
            return
        g.pairs.pop(pr.rec.name, None)
        if self.feeds.get(pr.rec.volume) is g:
            del self.feeds[pr.rec.volume]
        if not g.pairs:
            if g.ship_task is not None:
                g.ship_task.cancel()
            g.journal.reset()
            g.journal.close()
            with contextlib.suppress(OSError):
                os.rmdir(g.journal.dir)
            self.table.delete(g.rec.name)
            del self.groups[g.rec.name]

    async def start(self) -> None:
        for g in self.groups.values():
            if g.rec.hold:
                for pr in g.pairs.values():
                    self.mgr.hold(pr.rec.volume, g.rec.reason)
            if g.rec.role == "secondary":
                self.target.redo(g)
            if g.rec.feeder == self.node.name and g.rec.role == "primary":
                self.ship.check_after_restart(g)
                self.start_shipping(g)
        self.mgr.spawn(self._housekeeping())

    async def stop(self) -> None:
        for g in self.groups.values():
            if g.ship_task is not None:
                g.ship_task.cancel()
        for g in self.groups.values():
            if g.rec.role == "secondary":
                with contextlib.suppress(OSError):
                    self.target.checkpoint_now(g)
            with contextlib.suppress(OSError):
                g.journal.sync()
            self.save(g)
            g.journal.close()

    # ---- the write path (primary and standby) ---------------------------------------

    def on_applied(self, volume: str, cmd: int, offset: int, length: int,
                   data: Payload | None, flags: int, *, committed: bool) -> int:
        """This node applied a write to `volume`. As the primary of its group: journal it
        and return its sequence number (committed later unless `committed`). As the
        standby without a sequence number: mark its chunks dirty. Otherwise 0."""
        g = self.feeds.get(volume)
        if g is None:
            return 0
        rec = g.rec
        pr = self.pair_of(g, volume)
        if rec.role == "standby":
            return self.standby.write_alone(g, pr, cmd, offset, length, data, flags)
        if rec.role != "primary":
            self.mark(pr, offset, length)
            return 0
        seq = rec.written + 1
        now = clock.wall()
        if rec.mode == "journal":
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length, now,
                                       data if cmd == Cmd.WRITE and data else b"")
            except JournalFull as e:
                self.overflow(g, str(e))
                self.mark(pr, offset, length)
            except JournalError as e:
                self.suspend(g, f"journal: {e}")
                self.mark(pr, offset, length)
        else:
            self.mark(pr, offset, length)
        rec.written = seq
        rec.written_time = now
        if committed:
            g.wake.set()
        else:
            g.inflight[seq] = None
        return seq

    def commit(self, volume: str, seq: int) -> None:
        """The write to `volume` with this sequence number is complete (on both
        active-active copies). Numbers are per group: look in `volume`'s group only."""
        if not seq:
            return
        g = self.feeds.get(volume)
        if g is not None and g.inflight.pop(seq, 0) is None:
            g.wake.set()

    def settle(self, volume: str, seq: int, acknowledged: bool) -> None:
        """A write that reached only this copy is decided. Acknowledged (this copy goes on
        alone): its record ships. Failed (the partner may be writing alone now, under the
        same numbers): its record must not ship while this copy's data may be stale; it
        stays in flight, undecided, until this copy serves again with its data standing
        (then it ships) or is resynced from its partner (then it is dropped)."""
        if not seq:
            return
        g = self.feeds.get(volume)
        if acknowledged:
            self.commit(volume, seq)
        elif g is not None and seq in g.inflight:
            g.undecided.add(seq)

    def on_copied(self, volume: str, offset: int, length: int, seq: int) -> None:
        """A resync chunk arrived from the active-active partner (no record exists)."""
        g = self.feeds.get(volume)
        if g is None:
            return
        pr = self.pair_of(g, volume)
        if g.rec.hold:
            # Failback from the far copy: the active-active partner needs these chunks too.
            aa = self.mgr.by_volume.get(volume)
            if aa is not None and aa.rec.mode == "active-active" \
                    and aa.dirty.set_many(chunks_of(offset, length)):
                aa.dirty.sync_now()
            return
        self.mark(pr, offset, length)
        if g.rec.role == "standby":   # numbers up to `seq` are taken: never reuse them
            g.rec.seq_seen, g.rec.bitmap_until = far.after_copy_chunk(
                g.rec.seq_seen, g.rec.bitmap_until, g.rec.written, seq)
        elif g.rec.mode == "journal":
            # The feeder's copy was resynced by its partner: catch the target up by chunks.
            self.overflow(g, "resynced from the active-active partner", event="remote_catch_up",
                          drop_inflight=True)

    def on_standby_write(self, volume: str, seq: int, cmd: int, offset: int, length: int,
                         data: Payload | None, flags: int) -> None:
        self.standby.on_write(volume, seq, cmd, offset, length, data, flags)

    def written_for(self, volume: str) -> int:
        """The last sequence number this node knows for the group `volume` feeds."""
        g = self.feeds.get(volume)
        return 0 if g is None else g.rec.written

    def committed_for(self, volume: str) -> int:
        g = self.feeds.get(volume)
        return -1 if g is None or g.rec.role != "primary" else g.committed()

    def pair_of(self, g: GroupRuntime, volume: str) -> PairRuntime:
        for pr in g.pairs.values():
            if pr.rec.volume == volume:
                return pr
        raise KeyError(volume)

    def mark(self, pr: PairRuntime, offset: int, length: int) -> None:
        chunks = chunks_of(offset, length)
        if pr.copy_task is not None and not pr.copy_task.done():
            pr.recopy.update(chunks)
        if pr.dirty.set_many(chunks):
            self.mgr.spawn(pr.dirty.sync(self.node.executor))

    def overflow(self, g: GroupRuntime, reason: str, event: str = "journal_overflow",
                 drop_inflight: bool = False) -> None:
        """Records cannot carry the copy on (the journal is full, lacks what the target
        needs, or the copy stalled): track chunks instead of blocking hosts, catch up.
        Writes in flight stay counted (the target learns from `committed` when the
        chunks it gets hold only writes the standby has too), unless `drop_inflight`:
        this copy is being resynced from its partner, or one of them never completes."""
        rec = g.rec
        self.mark_unapplied(g)
        g.journal.reset()
        if drop_inflight:
            g.inflight.clear()
            g.undecided.clear()
        rec.mode = JournalMode.BITMAP
        rec.state = GroupState.COPYING
        rec.reason = f"catching up from dirty chunks: {reason}"
        self.save(g)
        self.node.events.publish(event, group=rec.name, reason=reason,
                                 written=rec.written, applied=rec.applied)
        log.warning(event.replace("_", " "), extra={"group": rec.name, "reason": reason})
        self._catch_up(g)

    def _catch_up(self, g: GroupRuntime) -> None:
        """Copy every dirty chunk of the group's pairs to the target (bitmap mode)."""
        for pr in g.pairs.values():
            if pr.rec.state != "copying":
                self.mgr.set_state(pr, "copying", g.rec.reason)
            pr.rec.copy_source = self.node.name
            if self.mgr.peers.is_up(g.rec.target):
                self.mgr.start_copy(pr)
        g.wake.set()

    def mark_unapplied(self, g: GroupRuntime, start: int | None = None) -> None:
        """Mark dirty what the journal holds from `start` (default: past what the target
        applied), before the journal is reset. A journal that cannot be read marks every
        chunk of the group: a full copy, never a silent gap in the far copy."""
        first = g.journal.first
        start = max(g.rec.applied + 1, first) if start is None else max(start, first or start)
        try:
            records = [r for r in g.journal.iter_from(start) if r.pair in g.pairs]
        except JournalError as e:
            log.error("journal damaged: every chunk of the group goes again",
                      extra={"group": g.rec.name, "error": str(e)})
            self.node.events.publish("journal_damaged", group=g.rec.name, error=str(e))
            for pr in g.pairs.values():
                self.mark(pr, 0, pr.vol.record.size)
            return
        for r in records:
            self.mark(g.pairs[r.pair], r.offset, r.length)

    def suspend(self, g: GroupRuntime, reason: str) -> None:
        if g.rec.state == "suspended" and g.rec.reason == reason:
            return
        g.rec.state = GroupState.SUSPENDED
        g.rec.reason = reason
        self.save(g)
        for pr in g.pairs.values():
            self.mgr.set_state(pr, "suspended", reason)
        self.node.events.publish("group_suspended", group=g.rec.name, reason=reason)
        log.error("remote copy suspended", extra={"group": g.rec.name, "reason": reason})

    # ---- shipping (the feeder) --------------------------------------------------------

    def start_shipping(self, g: GroupRuntime) -> None:
        if g.ship_task is None or g.ship_task.done():
            g.need_stat = True
            g.ship_task = asyncio.ensure_future(self.ship.run(g))

    def check_feeder(self, pr: PairRuntime, peer: str, chunks: range) -> None:
        self.target.on_chunk(pr, peer, chunks)

    def taken_over(self, g: GroupRuntime) -> None:
        """The target serves hosts now (DR takeover there): this copy is not the latest,
        so it must not serve hosts either until `twinvol dr failback`."""
        rec = g.rec
        g.checking_until = 0.0   # the answer is in: held until the failback
        reason = (f"the far copy at {rec.target} was taken over; run `twinvol dr failback` "
                  "to copy its changes back")
        if not rec.hold:
            rec.hold = True
            self.node.events.publish("group_taken_over", group=rec.name, at=rec.target)
        for pr in g.pairs.values():
            self.mgr.hold(pr.rec.volume, reason)
        self.suspend(g, reason)

    def wait_sync(self, volume: str, seq: int) -> asyncio.Future[None] | None:
        """Sync mode: a future done once the target holds record `seq` (None: no wait,
        the target is unreachable or the copy is not streaming records)."""
        g = self.feeds.get(volume)
        if g is None or not g.rec.sync or not seq or g.rec.state != "mirrored" \
                or g.rec.mode != "journal" or not self.mgr.peers.is_up(g.rec.target):
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        g.waiters.append((seq, fut))
        g.wake.set()
        return fut

    async def _housekeeping(self) -> None:
        """Target: durable checkpoints of what was applied. Feeder: is the copy moving?"""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            for g in list(self.groups.values()):
                if g.rec.feeder == self.node.name and g.rec.role == "primary":
                    self.ship.watch(g)
                if g.rec.role == "secondary" and g.checkpoint_due:
                    g.checkpoint_due = False
                    await asyncio.get_running_loop().run_in_executor(
                        self.node.executor, self.target.sync_group, g)
                    self.target.checkpoint_done(g)

    # ---- the target ---------------------------------------------------------------------

    def checkpoint_now(self, g: GroupRuntime) -> None:
        self.target.checkpoint_now(g)

    def target_copied(self, pr: PairRuntime, upto: int, committed: int = -1) -> None:
        self.target.copied(pr, upto, committed)

    def group_of(self, name: str) -> GroupRuntime:
        g = self.groups.get(name)
        if g is None:
            raise RemoteError(f"no consistency group {name!r} on node {self.node.name}",
                              "not_found")
        return g

    # ---- peer messages ------------------------------------------------------------------

    def on_message(self, peer: str, h: dict[str, Any], payload: Payload) -> Message:
        try:
            msg = rm.decode(h)
        except BadMessage as e:
            raise RemoteError(str(e), "invalid") from None
        if isinstance(msg, rm.Fed):
            heard = self.groups.get(msg.group)
            if heard is not None and heard.rec.feeder == peer:
                self.target.heard(heard, msg)
        if isinstance(msg, rm.Records):
            return self.target.on_records(peer, msg, payload)
        if isinstance(msg, rm.StatRequest):
            return rm.stat_reply(self.group_of(msg.group).rec)
        if isinstance(msg, rm.Progress):
            return self.standby.on_progress(msg)
        if isinstance(msg, rm.TargetPrepare):
            return self.target.prepare(peer, msg)
        if isinstance(msg, rm.StandbyPrepare):
            return self.standby.prepare(peer, msg)
        if isinstance(msg, rm.NewFeeder):
            return self.dr.on_new_feeder(peer, msg)
        if isinstance(msg, rm.Failback):
            return self.dr.on_failback(peer, msg, payload)
        if isinstance(msg, rm.FailbackDone):
            return self.dr.failback_done(msg)
        if isinstance(msg, rm.Resume):
            return self.target.resume(msg)
        return self.target.bits(msg)

    def ensure_group(self, name: str, role: GroupRole, target: str, feeder: str,
                      limit: int) -> GroupRuntime:
        g = self.groups.get(name)
        if g is not None:
            if g.rec.role != role or g.rec.target != target:
                raise RemoteError(f"group {name!r} on node {self.node.name} is already "
                                  f"{g.rec.role} towards {g.rec.target}", "conflict")
            return g
        g = self.open_group(GroupRecord(name=name, role=role, target=target, feeder=feeder,
                                         journal_limit=limit, origin=feeder))
        self.save(g)
        return g

    # ---- creation (on the primary) ---------------------------------------------------------

    async def create(self, name: str, volume: str, target: str, target_volume: str,
                     group: str, journal_limit: int, sync: bool = False) -> PairRecord:
        return await self.setup.create(name, volume, target, target_volume, group,
                                       journal_limit, sync)

    def other_sides(self, pr: PairRuntime) -> list[str]:
        """Nodes besides the partner that hold this async pair (the standby / the feeder)."""
        g = self.groups.get(pr.rec.group)
        if g is None:
            return []
        nodes = {g.rec.feeder, g.rec.target}
        aa = self.mgr.by_volume.get(pr.rec.volume)
        if aa is not None and aa.rec.mode == "active-active":
            nodes.add(aa.rec.partner)
        nodes.discard(self.node.name)
        nodes.discard(pr.rec.partner)
        return sorted(nodes)

    def on_up(self, peer: str) -> None:
        for g in self.groups.values():
            if g.rec.target == peer and g.rec.feeder == self.node.name:
                g.need_stat = True
                self.start_shipping(g)
                g.wake.set()
                for pr in g.pairs.values():
                    if pr.rec.state == "copying" and pr.rec.copy_source == self.node.name \
                            and self.ship.serving(g):
                        self.mgr.start_copy(pr)

    def failback_copied(self, pr: PairRuntime) -> None:
        self.dr.failback_copied(pr)

    def copy_done(self, pr: PairRuntime) -> None:
        """An initial copy or catch-up to the target finished."""
        g = self.groups.get(pr.rec.group)
        if g is None:
            return
        if pr.dirty.count():
            # Written again while being copied (bitmap mode): go round once more, once
            # this copy task has ended.
            self.mgr.set_state(pr, "copying", g.rec.reason)
            asyncio.get_running_loop().call_soon(self.mgr.start_copy, pr)
            return
        if not all(p.rec.state != "copying" for p in g.pairs.values()):
            return
        rec = g.rec
        if rec.mode == "bitmap":
            # Caught up: the target now holds every write up to `written`; records resume
            # after it, in this same loop step (no write can fall between).
            g.journal.reset()
            rec.mode = JournalMode.JOURNAL
            link = self.mgr.link_or_none(rec.target)
            if link is not None:
                fut = link.request(rm.encode(rm.Resume(
                    rec.name, seq=rec.written, time=rec.written_time,
                    committed=g.committed(), at=clock.wall())))
                fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            rec.sent = rec.received = rec.applied = rec.written
            rec.applied_time = rec.written_time
            self.node.events.publish("journal_resumed", group=rec.name, seq=rec.written)
        rec.state = GroupState.MIRRORED
        rec.reason = ""
        self.save(g)
        g.wake.set()

    # ---- views ---------------------------------------------------------------------------

    def view(self, pr: PairRuntime) -> dict[str, Any]:
        g = self.groups.get(pr.rec.group)
        return {} if g is None else group_view(g, self.node.name, clock.wall(),
                                               clock.monotonic())
