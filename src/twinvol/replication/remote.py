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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import msgspec

from twinvol.nbd.constants import Cmd
from twinvol.replication.bitmap import chunks_of, nchunks
from twinvol.replication.core.stall import Stalled
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.replication.dr import DisasterRecovery
from twinvol.replication.pairs import PairRecord, new_generation
from twinvol.replication.peer import Message, PeerDown, RemoteError
from twinvol.replication.ports import ManagerPort
from twinvol.replication.remote_status import group_view
from twinvol.replication.runtime import GroupRecord, GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.journal import (
    Journal,
    JournalCorrupt,
    JournalError,
    JournalFull,
    Record,
    decode_one,
)
from twinvol.storage.volumes import VolumeError

log = logging.getLogger("twinvol.remote")

BATCH_BYTES = 1024 * 1024
WINDOW = 4                 # journal batches in flight to the target
CHECKPOINT_EVERY = 0.3     # seconds between durable apply checkpoints at the target
PROGRESS_EVERY = 0.3       # seconds between progress reports to the standby
BITS_NEEDED = 1 << 62      # (standby) dirty chunks stand for writes no record holds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


class RemoteCopy:
    """The async-copy side of a node's replication manager."""

    def __init__(self, mgr: ManagerPort) -> None:
        self.mgr = mgr
        self.node = mgr.node
        self.db = self.node.volumes.catalog.db
        self.db.executescript(_SCHEMA)
        self.dir = os.path.join(self.node.data_dir, "journals")
        self.groups: dict[str, GroupRuntime] = {}
        self.feeds: dict[str, GroupRuntime] = {}   # volume -> group it feeds (primary/standby)
        self.dr = DisasterRecovery(self)
        for (body,) in self.db.execute("SELECT body FROM groups ORDER BY name").fetchall():
            rec = msgspec.json.decode(body, type=GroupRecord)
            self._open_group(rec)

    # ---- records and lifecycle ----------------------------------------------------

    def _open_group(self, rec: GroupRecord) -> GroupRuntime:
        journal = Journal(os.path.join(self.dir, rec.name), rec.journal_limit)
        g = GroupRuntime(rec, journal)
        self.groups[rec.name] = g
        # The record is saved now and then; the journal is the truth after a crash: a
        # sequence number it holds must never be handed out again.
        if rec.role == "primary":
            rec.written = max(rec.written, journal.last)
        elif rec.role == "standby":
            rec.seq_seen = max(rec.seq_seen, journal.last)
        if journal.corrupt_at is not None:
            rec.state = "suspended"
            rec.reason = f"journal damaged at sequence {journal.corrupt_at}"
        return g

    def save(self, g: GroupRuntime) -> None:
        g.rec.updated = time.time()
        g.last_save = time.monotonic()
        self.db.execute("INSERT OR REPLACE INTO groups (name, body) VALUES (?, ?)",
                        (g.rec.name, msgspec.json.encode(g.rec).decode()))

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
            self.db.execute("DELETE FROM groups WHERE name = ?", (g.rec.name,))
            del self.groups[g.rec.name]

    async def start(self) -> None:
        for g in self.groups.values():
            if g.rec.hold:
                for pr in g.pairs.values():
                    self.mgr.hold(pr.rec.volume, g.rec.reason)
            if g.rec.role == "secondary":
                self._redo(g)
            if g.rec.feeder == self.node.name and g.rec.role == "primary":
                self.start_shipping(g)
        self.mgr.spawn(self._housekeeping())

    async def stop(self) -> None:
        for g in self.groups.values():
            if g.ship_task is not None:
                g.ship_task.cancel()
        for g in self.groups.values():
            if g.rec.role == "secondary":
                with contextlib.suppress(OSError):
                    self.checkpoint_now(g)
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
        pr = self._pair_of(g, volume)
        if rec.role == "standby":
            return self._standby_alone(g, pr, cmd, offset, length, data, flags)
        if rec.role != "primary":
            self.mark(pr, offset, length)
            return 0
        seq = rec.written + 1
        now = time.time()
        if rec.mode == "journal":
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length, now,
                                       data if cmd == Cmd.WRITE and data else b"")
            except JournalFull as e:
                self._overflow(g, str(e))
                self.mark(pr, offset, length)
            except JournalError as e:
                self._suspend(g, f"journal: {e}")
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

    def _standby_alone(self, g: GroupRuntime, pr: PairRuntime, cmd: int, offset: int,
                       length: int, data: Payload | None, flags: int) -> int:
        """The standby writes as the active-active primary. When its partner (the feeder)
        is lost, it continues the journal itself: the target never holds a sequence number
        the standby lacks (records ship only once both copies have them), so the next
        number after the last one it journaled is free. Otherwise: dirty chunks."""
        rec = g.rec
        aa = self.mgr.by_volume.get(pr.rec.volume)
        alone = aa is not None and aa.rec.io_mode == "local"
        if alone and rec.mode == "journal" and g.journal.corrupt_at is None:
            seq = rec.seq_seen + 1
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length,
                                       time.time(),
                                       data if cmd == Cmd.WRITE and data else b"")
                rec.seq_seen = seq
                rec.written = max(rec.written, seq)
                return 0
            except JournalError as e:
                self._standby_to_bitmap(g, f"standby journal: {e}")
        self.mark(pr, offset, length)
        rec.bitmap_until = BITS_NEEDED
        return 0

    def commit(self, volume: str, seq: int) -> None:
        """The write to `volume` with this sequence number is complete (on both
        active-active copies). Numbers are per group: look in `volume`'s group only."""
        if not seq:
            return
        g = self.feeds.get(volume)
        if g is not None and g.inflight.pop(seq, 0) is None:
            g.wake.set()

    def on_standby_write(self, volume: str, seq: int, cmd: int, offset: int, length: int,
                         data: Payload | None, flags: int) -> None:
        """A mirrored write with the primary's sequence number: keep the same record."""
        g = self.feeds.get(volume)
        if g is None:
            return
        pr = self._pair_of(g, volume)
        if g.rec.role != "standby":
            # We feed the target ourselves now (takeover): this write still needs a record.
            self.on_applied(volume, cmd, offset, length, data, flags, committed=True)
            return
        rec = g.rec
        last = rec.seq_seen
        if rec.mode == "journal" and (last == 0 or seq == last + 1):
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length,
                                       time.time(),
                                       data if cmd == Cmd.WRITE and data else b"")
                rec.seq_seen = seq
            except JournalError as e:
                self._standby_to_bitmap(g, f"standby journal: {e}")
                self.mark(pr, offset, length)
        else:
            if rec.mode == "journal":
                self._standby_to_bitmap(g, f"sequence gap: {seq} after {last}")
            self.mark(pr, offset, length)
        if rec.mode == "bitmap":
            # Covered by dirty chunks; the journal resumes after it once they are cleared.
            rec.bitmap_until = max(rec.bitmap_until, seq)
            rec.seq_seen = max(rec.seq_seen, seq)
        rec.written = max(rec.written, seq)

    def on_copied(self, volume: str, offset: int, length: int, seq: int) -> None:
        """A resync chunk arrived from the active-active partner (no record exists)."""
        g = self.feeds.get(volume)
        if g is None:
            return
        pr = self._pair_of(g, volume)
        if g.rec.hold:
            # Failback from the far copy: the active-active partner needs these chunks too.
            aa = self.mgr.by_volume.get(volume)
            if aa is not None and aa.rec.mode == "active-active" \
                    and aa.dirty.set_many(chunks_of(offset, length)):
                self.mgr.spawn(aa.dirty.sync(self.node.executor))
            return
        self.mark(pr, offset, length)
        if g.rec.role == "standby":
            g.rec.bitmap_until = max(g.rec.bitmap_until, seq, g.rec.written)
        elif g.rec.mode == "journal":
            # The feeder's copy was resynced by its partner: catch the target up by chunks.
            self._overflow(g, "resynced from the active-active partner", event="remote_catch_up")

    def written_for(self, volume: str) -> int:
        """The last sequence number this node knows for the group `volume` feeds."""
        g = self.feeds.get(volume)
        return 0 if g is None else g.rec.written

    def _pair_of(self, g: GroupRuntime, volume: str) -> PairRuntime:
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

    def _overflow(self, g: GroupRuntime, reason: str, event: str = "journal_overflow") -> None:
        """Records cannot carry the copy on (the journal is full, lacks what the target
        needs, or the copy stalled): track chunks instead of blocking hosts, catch up."""
        rec = g.rec
        self.mark_unapplied(g)
        g.journal.reset()
        g.inflight.clear()  # their records were just marked dirty with the rest
        rec.mode = "bitmap"
        rec.state = "copying"
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

    def _standby_to_bitmap(self, g: GroupRuntime, reason: str) -> None:
        """The standby lacks records (its partner wrote alone, its journal filled): its
        dirty chunks stand for them until the target has applied past them. Not a fault
        of the far copy, which the feeder still serves."""
        self.mark_unapplied(g)
        g.journal.reset()
        g.rec.mode = "bitmap"
        self.save(g)
        self.node.events.publish("standby_bitmap", group=g.rec.name, reason=reason)
        log.info("standby tracks dirty chunks", extra={"group": g.rec.name, "reason": reason})

    def _suspend(self, g: GroupRuntime, reason: str) -> None:
        if g.rec.state == "suspended" and g.rec.reason == reason:
            return
        g.rec.state = "suspended"
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
            g.ship_task = asyncio.ensure_future(self._ship(g))

    async def _ship(self, g: GroupRuntime) -> None:
        rec = g.rec
        window: list[asyncio.Future[Message]] = []
        while True:
            g.wake.clear()
            link = self.mgr.link_or_none(rec.target)
            if link is None or rec.state == "suspended" or rec.feeder != self.node.name:
                if g.waiters:
                    self._release_waiters(g, None)
                window.clear()
                g.need_stat = True
                await self._idle(g, 1.0)
                continue
            try:
                if g.need_stat:
                    h, _ = await link.request({"t": "jstat", "group": rec.name})
                    g.last_stat = time.monotonic()
                    if not self._still_feeder(g, h):
                        continue
                    self._learn(g, h)
                    rec.sent = max(int(h["received"]), rec.applied)
                    g.need_stat = False
                committed = g.committed()
                if rec.mode != "journal" or rec.sent >= committed:
                    while window:
                        self._progress(g, (await window.pop(0))[0])
                    self._report_standby(g)
                    await self._idle(g, CHECKPOINT_EVERY)
                    if not g.wake.is_set() and (rec.applied < rec.sent
                                                or time.monotonic() - g.last_stat > 1.0):
                        # Learn the target's next durable checkpoint (trims the journal),
                        # and whether it still takes records from here.
                        h, _ = await link.request({"t": "jstat", "group": rec.name})
                        g.last_stat = time.monotonic()
                        if self._still_feeder(g, h):
                            self._progress(g, h)
                    continue
                if rec.sent < g.journal.first - 1 or (g.journal.first == 0
                                                      and rec.sent < committed):
                    # The journal no longer holds what the target needs.
                    self._overflow(g, f"the journal lacks sequence {rec.sent + 1}",
                                   event="remote_catch_up")
                    continue
                first = rec.sent + 1
                last, blob = g.journal.read_encoded(first, BATCH_BYTES, seq_to=committed)
                window.append(link.request(
                    {"t": "jr", "group": rec.name, "first": first, "last": last,
                     "written": rec.written, "wtime": rec.written_time}, blob))
                rec.sent = last
                rec.bytes_shipped += len(blob)
                rec.records_shipped += last - first + 1
                if len(window) >= WINDOW:
                    self._progress(g, (await window.pop(0))[0])
                    self._report_standby(g)  # also while never idle (throttled)
            except JournalCorrupt as e:
                self._suspend(g, f"journal record {e.seq + 1} failed its CRC check: nothing "
                                 "past it is shipped; resync the pair to repair the copy")
                self.node.events.publish("journal_corrupt", group=rec.name, seq=e.seq + 1)
            except RemoteError as e:
                window.clear()
                if e.code == "corrupt":
                    self._suspend(g, f"the target refused a damaged record: {e}")
                    self.node.events.publish("journal_corrupt", group=rec.name, error=str(e))
                else:
                    log.warning("journal shipping refused", extra={"group": rec.name,
                                                                   "error": str(e)})
                    g.need_stat = True
                    await asyncio.sleep(0.5)
            except PeerDown:
                window.clear()
                g.need_stat = True
                if g.waiters:
                    self._release_waiters(g, None)
            except Exception as e:  # a bug must not stop the copy while status says mirrored
                log.exception("journal shipping failed", extra={"group": rec.name})
                window.clear()
                g.need_stat = True
                self._stalled(g, Stalled(f"shipping failed: {type(e).__name__}: {e}"))
                await asyncio.sleep(1.0)

    def _still_feeder(self, g: GroupRuntime, h: dict[str, Any]) -> bool:
        """The target's view: taken over, or fed by another node since (DR)?"""
        if h.get("state") == "takeover":
            self.taken_over(g)
            return False
        if h.get("feeder") and h["feeder"] != self.node.name:
            self.demote(g, str(h["feeder"]))
            return False
        return True

    def demote(self, g: GroupRuntime, feeder: str) -> None:
        """Another node feeds the target now (a DR takeover while this node was away):
        become its standby. What this copy wrote that the target may lack is marked
        dirty; the records of the new feeder arrive with the mirrored writes."""
        rec = g.rec
        self.mark_unapplied(g)
        g.journal.reset()
        old, rec.role, rec.feeder = rec.role, "standby", feeder
        rec.mode = "bitmap"
        rec.bitmap_until = rec.seq_seen = rec.written = 0
        rec.state = "copying"
        self._release_waiters(g, None)
        for pr in g.pairs.values():
            if pr.copy_task is not None:
                pr.copy_task.cancel()
            pr.rec.role = Role.STANDBY
            pr.rec.copy_source = ""
            self.mgr.save(pr)
        self.save(g)
        self.node.events.publish("group_demoted", group=rec.name, feeder=feeder,
                                 previous=old)
        log.warning("remote copy fed by another node now",
                    extra={"group": rec.name, "feeder": feeder})

    def check_feeder(self, pr: PairRuntime, peer: str) -> None:
        """The target accepts copy data only from the node that feeds it."""
        g = self.groups.get(pr.rec.group)
        if g is None or g.rec.feeder != peer or g.rec.state == "takeover":
            raise RemoteError(f"node {self.node.name} takes copy data for group "
                              f"{pr.rec.group!r} only from its feeder "
                              f"{g.rec.feeder if g else '?'}, not {peer}", "conflict")

    def taken_over(self, g: GroupRuntime) -> None:
        """The target serves hosts now (DR takeover there): this copy is not the latest,
        so it must not serve hosts either until `twinvol dr failback`."""
        rec = g.rec
        reason = (f"the far copy at {rec.target} was taken over; run `twinvol dr failback` "
                  "to copy its changes back")
        if not rec.hold:
            rec.hold = True
            self.node.events.publish("group_taken_over", group=rec.name, at=rec.target)
        for pr in g.pairs.values():
            self.mgr.hold(pr.rec.volume, reason)
        self._suspend(g, reason)

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

    @staticmethod
    def _release_waiters(g: GroupRuntime, upto: int | None) -> None:
        """Complete sync writes the target holds (all of them when `upto` is None: the
        target is lost and writes continue without it, recorded in the journal)."""
        keep = []
        for seq, fut in g.waiters:
            if upto is None or seq <= upto:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((seq, fut))
        g.waiters = keep

    async def _idle(self, g: GroupRuntime, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(g.wake.wait(), timeout)

    def _learn(self, g: GroupRuntime, h: dict[str, Any]) -> None:
        rec = g.rec
        rec.received = int(h["received"])
        if int(h["applied"]) >= rec.applied:
            rec.applied = int(h["applied"])
            rec.applied_time = float(h.get("applied_time", rec.applied_time))

    def _progress(self, g: GroupRuntime, h: dict[str, Any]) -> None:
        """A reply from the target: it received/applied up to these sequence numbers."""
        self._learn(g, h)
        if g.waiters:
            self._release_waiters(g, g.rec.received)
        g.journal.trim(g.rec.applied)
        if time.monotonic() - g.last_save > 0.5:
            self.save(g)

    def _report_standby(self, g: GroupRuntime) -> None:
        """Piggy-back the copy progress to the standby (when it changed, throttled)."""
        now = time.monotonic()
        if now - g.last_progress < PROGRESS_EVERY:
            return
        g.last_progress = now
        self.save(g)
        for pr in g.pairs.values():
            aa = self.mgr.by_volume.get(pr.rec.volume)
            if aa is None or aa.rec.mode != "active-active":
                continue
            link = self.mgr.link_or_none(aa.rec.partner)
            if link is None:
                continue
            fut = link.request({"t": "jprog", "group": g.rec.name, "written": g.rec.written,
                                "wtime": g.rec.written_time, "received": g.rec.received,
                                "applied": g.rec.applied, "atime": g.rec.applied_time,
                                "state": g.rec.state})
            fut.add_done_callback(lambda f: f.exception())
            return

    async def _housekeeping(self) -> None:
        """Target: durable checkpoints of what was applied. Feeder: is the copy moving?"""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            for g in list(self.groups.values()):
                if g.rec.feeder == self.node.name and g.rec.role == "primary":
                    self._watch(g)
                if g.rec.role == "secondary" and g.checkpoint_due:
                    g.checkpoint_due = False
                    await asyncio.get_running_loop().run_in_executor(
                        self.node.executor, self._sync_group, g)
                    self._checkpoint_done(g)

    def _watch(self, g: GroupRuntime) -> None:
        """A copy that stopped says so and catches up by itself (from dirty chunks)."""
        rec = g.rec
        if rec.state in ("suspended", "takeover") or rec.hold:
            g.progress.reset(time.monotonic())
            return
        up = self.mgr.peers.is_up(rec.target)
        if rec.mode == "bitmap" and up:
            for pr in g.pairs.values():
                if pr.rec.state == "copying" and (pr.copy_task is None or pr.copy_task.done()):
                    log.warning("catch-up copy not running: restarting it",
                                extra={"group": rec.name, "pair": pr.rec.name})
                    pr.rec.copy_source = self.node.name
                    self.mgr.start_copy(pr)
        if g.ship_task is None or g.ship_task.done():
            self.start_shipping(g)
        stalled = g.progress.observe(time.monotonic(), written=rec.written,
                                     committed=g.committed(), sent=rec.sent,
                                     applied=rec.applied,
                                     oldest_inflight=next(iter(g.inflight), 0),
                                     target_up=up, streaming=rec.mode == "journal")
        if stalled is not None:
            self._stalled(g, stalled)

    def _stalled(self, g: GroupRuntime, stall: Stalled) -> None:
        log.error("far copy stalled", extra={"group": g.rec.name, "reason": stall.reason})
        g.progress.reset(time.monotonic())
        self._overflow(g, f"the copy stalled: {stall.reason}", event="remote_stalled")

    def _sync_group(self, g: GroupRuntime) -> None:
        for pr in list(g.pairs.values()):
            pr.vol.store.flush()
        g.journal.sync()

    def checkpoint_now(self, g: GroupRuntime) -> None:
        self._sync_group(g)
        self._checkpoint_done(g)

    def _checkpoint_done(self, g: GroupRuntime) -> None:
        g.rec.applied = g.rec.received
        self.save(g)
        g.journal.trim(g.rec.applied)

    # ---- the target ---------------------------------------------------------------------

    def _redo(self, g: GroupRuntime) -> None:
        """After a restart, apply journaled records past the last checkpoint, in order."""
        rec = g.rec
        n = 0
        try:
            for r in g.journal.iter_from(max(rec.applied + 1, g.journal.first or 1)):
                self._apply_record(g, r)
                n += 1
        except JournalError as e:
            self._suspend(g, f"receive journal: {e}")
        rec.received = max(rec.applied, g.journal.last)
        if n:
            self.checkpoint_now(g)
            log.info("journal redo", extra={"group": rec.name, "records": n})
            self.node.events.publish("journal_redo", group=rec.name, records=n,
                                     applied=rec.applied)

    def _apply_record(self, g: GroupRuntime, r: Record) -> None:
        pr = g.pairs.get(r.pair)
        if pr is None:
            raise RemoteError(f"record {r.seq} names pair {r.pair!r}, which is not in group "
                              f"{g.rec.name!r} on node {self.node.name}", "invalid")
        if r.offset < 0 or r.offset + r.length > pr.vol.record.size:
            raise RemoteError(f"record {r.seq} is outside volume {pr.rec.volume}", "corrupt")
        self.mgr.apply(pr, r.cmd, r.offset, r.length, r.data, r.flags)
        if pr.rec.state == "takeover" or pr.rec.io_mode == "local":
            return
        g.rec.applied_time = r.time

    def _on_records(self, peer: str, h: dict[str, Any], payload: Payload) -> Message:
        g = self.group_of(h)
        rec = g.rec
        if rec.role != "secondary":
            raise RemoteError(f"node {self.node.name} is not the target of group "
                              f"{rec.name!r}", "conflict")
        if rec.feeder != peer:
            raise RemoteError(f"group {rec.name!r} is fed by {rec.feeder}, not {peer}",
                              "conflict")
        if rec.state == "takeover":
            raise RemoteError(f"group {rec.name!r} was taken over at {self.node.name}",
                              "conflict")
        error: JournalCorrupt | None = None
        mv = memoryview(payload)
        pos, start, expect = 0, -1, rec.received + 1
        new: list[Record] = []
        sizes: list[tuple[int, int]] = []
        while pos < len(mv):
            try:
                got = decode_one(mv, pos, 0)
                if got is None:
                    raise JournalCorrupt("journal batch cut short", expect - 1)
            except JournalCorrupt as e:
                error = e
                break
            r, end = got
            if r.seq >= expect:
                if r.seq != expect:
                    raise RemoteError(f"record {r.seq} does not follow {expect - 1}", "gap")
                if start < 0:
                    start = pos
                new.append(r)
                sizes.append((r.seq, end - pos))
                expect += 1
            pos = end
        if new:
            # Journal the whole run first (one write), then apply it in order: a crash in
            # between re-applies from the journal, never leaving half a batch applied.
            g.journal.append_run(sizes, mv[start:start + sum(n for _, n in sizes)])
            for r in new:
                self._apply_record(g, r)
                rec.received = r.seq
        rec.written = max(rec.written, int(h.get("written", 0)))
        rec.written_time = max(rec.written_time, float(h.get("wtime", 0.0)))
        self._maybe_mirrored(g)
        g.checkpoint_due = True
        if error is not None:
            self._suspend(g, f"journal record after {rec.received} failed its CRC check; "
                             "nothing past it was applied")
            self.node.events.publish("journal_corrupt", group=rec.name, seq=rec.received + 1)
            raise RemoteError(str(error), "corrupt")
        return self.stat(g), b""

    def target_copied(self, pr: PairRuntime, upto: int) -> None:
        """Far site: a pair's initial copy (or catch-up) is complete; the group is a
        consistent copy once it also holds every record up to `upto`."""
        g = self.groups.get(pr.rec.group)
        if g is None or g.rec.role != "secondary" or g.rec.state == "takeover":
            return
        g.rec.consistent_at = max(g.rec.consistent_at, upto)
        self._maybe_mirrored(g)
        self.save(g)

    def _maybe_mirrored(self, g: GroupRuntime) -> None:
        rec = g.rec
        if rec.state == "copying" and rec.received >= rec.consistent_at \
                and not any(p.rec.state == "copying" for p in g.pairs.values()):
            rec.state = "mirrored"
            self.save(g)

    def stat(self, g: GroupRuntime) -> dict[str, Any]:
        rec = g.rec
        return {"received": rec.received, "applied": rec.applied,
                "applied_time": rec.applied_time, "state": rec.state, "feeder": rec.feeder,
                "written": rec.written}

    def group_of(self, h: dict[str, Any]) -> GroupRuntime:
        g = self.groups.get(str(h.get("group")))
        if g is None:
            raise RemoteError(f"no consistency group {h.get('group')!r} on node "
                              f"{self.node.name}", "not_found")
        return g

    # ---- peer messages ------------------------------------------------------------------

    def on_message(self, peer: str, h: dict[str, Any], payload: Payload
                   ) -> Message:
        t = h["t"]
        if t in ("jr", "jstat", "jprog", "jresume"):
            heard = self.groups.get(str(h.get("group")))
            if heard is not None and heard.rec.feeder == peer:
                heard.last_heard = time.monotonic()
        if t == "jr":
            return self._on_records(peer, h, payload)
        if t == "jstat":
            return self.stat(self.group_of(h)), b""
        if t == "jprog":
            return self._on_progress(h)
        if t == "a_prepare":
            return self._prepare_target(peer, h)
        if t == "a_standby":
            return self._prepare_standby(peer, h)
        if t == "jfeeder":
            return self.dr.on_new_feeder(peer, h)
        if t == "a_failback":
            return self.dr.on_failback(peer, h, payload)
        if t == "a_failback_done":
            return self.dr.failback_done(h)
        if t == "jresume":
            g = self.group_of(h)
            g.journal.reset()
            g.rec.received = g.rec.applied = int(h["seq"])
            g.rec.applied_time = float(h.get("time", time.time()))
            g.rec.state = "mirrored"
            self.checkpoint_now(g)
            return self.stat(g), b""
        raise RemoteError(f"unknown remote-copy message {t!r}", "invalid")

    def _on_progress(self, h: dict[str, Any]) -> Message:
        g = self.group_of(h)
        rec = g.rec
        if rec.role != "standby":
            return {}, b""
        rec.written = max(rec.written, int(h["written"]))
        rec.written_time = float(h["wtime"])
        rec.received = int(h["received"])
        rec.applied = int(h["applied"])
        rec.applied_time = float(h["atime"])
        rec.state = str(h.get("state", rec.state))
        g.journal.trim(rec.applied)
        for pr in g.pairs.values():
            if pr.rec.state != rec.state and rec.state in ("mirrored", "copying", "suspended"):
                self.mgr.set_state(pr, rec.state, rec.reason)
        if rec.applied >= rec.bitmap_until and rec.state == "mirrored":
            # The target has everything the dirty chunks stood for.
            for pr in g.pairs.values():
                pr.dirty.clear_all()
                self.mgr.spawn(pr.dirty.sync(self.node.executor))
            if rec.mode == "bitmap" and g.journal.last == 0:
                rec.mode = "journal"
        self.save(g)
        return {}, b""

    def _ensure_group(self, name: str, role: str, target: str, feeder: str,
                      limit: int) -> GroupRuntime:
        g = self.groups.get(name)
        if g is not None:
            if g.rec.role != role or g.rec.target != target:
                raise RemoteError(f"group {name!r} on node {self.node.name} is already "
                                  f"{g.rec.role} towards {g.rec.target}", "conflict")
            return g
        g = self._open_group(GroupRecord(name=name, role=role, target=target, feeder=feeder,
                                         journal_limit=limit, origin=feeder))
        self.save(g)
        return g

    def _prepare_target(self, peer: str, h: dict[str, Any]) -> Message:
        """Far-site side of async pair creation: a blocked volume with the same identity."""
        mgr = self.mgr
        name, vname, size = str(h["pair"]), str(h["volume"]), int(h["size"])
        if name in mgr.pairs:
            raise RemoteError(f"pair {name!r} already exists here", "conflict")
        _vol, own = mgr.take_identity(name, vname, size, h)
        g = self._ensure_group(str(h["group"]), "secondary", self.node.name, peer,
                               int(h["journal_limit"]))
        rec = PairRecord(name=name, mode=str(h.get("mode", "async")), role=Role.SECONDARY,
                         volume=vname,
                         partner=peer, partner_volume=str(h["partner_volume"]),
                         state=PairState.COPYING, io_mode=Mode.BLOCK, gen_current=str(h["gen"]),
                         copy_total=nchunks(size), own_identity=own, group=g.rec.name)
        g.rec.state = "copying"
        self.save(g)
        mgr.store.save(rec)
        mgr.load(rec)
        self.node.events.publish("pair_created", pair=name, role="secondary", partner=peer,
                                 mode=rec.mode)
        return {}, b""

    def _prepare_standby(self, peer: str, h: dict[str, Any]) -> Message:
        """Active-active partner of the primary: keep records with the same numbers."""
        mgr = self.mgr
        name, vname = str(h["pair"]), str(h["volume"])
        if name in mgr.pairs:
            raise RemoteError(f"pair {name!r} already exists here", "conflict")
        vol = self.node.volumes.get(vname)
        g = self._ensure_group(str(h["group"]), "standby", str(h["target"]), peer,
                               int(h["journal_limit"]))
        g.rec.written = max(g.rec.written, int(h["written"]))
        # Until the initial copy is done the standby could only feed the target in full;
        # after it, its journal holds every write from here on.
        g.rec.bitmap_until = max(g.rec.bitmap_until, int(h["written"]))
        self.save(g)
        rec = PairRecord(name=name, mode="async", role=Role.STANDBY, volume=vol.record.name,
                         partner=str(h["target"]), partner_volume=str(h["target_volume"]),
                         state=PairState.COPYING, io_mode=Mode(vol.io_mode),
                         gen_current=str(h["gen"]),
                         copy_total=nchunks(vol.record.size), group=g.rec.name)
        mgr.store.save(rec)
        pr = mgr.load(rec)
        pr.dirty.set_all()
        pr.dirty.sync_now()
        return {}, b""

    # ---- creation (on the primary) ---------------------------------------------------------

    async def create(self, name: str, volume: str, target: str, target_volume: str,
                     group: str, journal_limit: int, sync: bool = False) -> PairRecord:
        mgr = self.mgr
        mode = "sync" if sync else "async"
        vol = self.node.volumes.get(volume)
        aa = mgr.by_volume.get(vol.record.name)
        if sync and aa is not None:
            raise VolumeError(f"volume {volume!r} is in pair {aa.rec.name!r}: a sync remote "
                              "copy needs a volume of its own (use --mode async)")
        if aa is not None and aa.rec.mode != "active-active":
            raise VolumeError(f"volume {volume!r} is already in pair {aa.rec.name!r}",
                              "conflict")
        if vol.record.name in self.feeds:
            raise VolumeError(f"volume {volume!r} already has a remote copy "
                              f"(group {self.feeds[vol.record.name].rec.name!r})", "conflict")
        if aa is not None and aa.rec.role != "primary":
            raise VolumeError(f"volume {volume!r} is the secondary of active-active pair "
                              f"{aa.rec.name!r}: create the remote copy on its primary "
                              f"({aa.rec.partner})")
        if aa is not None and target == aa.rec.partner:
            raise VolumeError(f"node {target} already holds the active-active copy")
        g = self.groups.get(group)
        if g is not None and g.rec.sync != sync:
            raise VolumeError(f"consistency group {group!r} is "
                              f"{'sync' if g.rec.sync else 'async'}; its pairs share one mode",
                              "conflict")
        if g is not None and (g.rec.role != "primary" or g.rec.target != target):
            raise VolumeError(f"consistency group {group!r} is {g.rec.role} towards "
                              f"{g.rec.target} on this node; its volumes must share one "
                              "primary and one target", "conflict")
        link = mgr.peers.link(target) if mgr.peers.is_up(target) else None
        if link is None:
            raise VolumeError(f"node {target} is not connected (peer link down)", "io")
        r = vol.record
        gen = new_generation()
        limit = g.rec.journal_limit if g is not None else journal_limit
        try:
            await link.request({"t": "a_prepare", "pair": name, "volume": target_volume,
                                "partner_volume": r.name, "size": r.size, "serial": r.serial,
                                "vvol_id": r.vvol_id, "export_name": r.export_name,
                                "description": r.description, "gen": gen, "group": group,
                                "journal_limit": limit, "mode": mode})
            if aa is not None:
                plink = mgr.peers.link(aa.rec.partner)
                await plink.request({"t": "a_standby", "pair": name,
                                     "volume": aa.rec.partner_volume, "target": target,
                                     "target_volume": target_volume, "group": group,
                                     "journal_limit": limit, "gen": gen,
                                     "written": g.rec.written if g else 0})
        except RemoteError as e:
            raise VolumeError(f"{e}", e.code if e.code in (
                "invalid", "not_found", "conflict", "busy") else "io") from None
        except PeerDown as e:
            raise VolumeError(f"a node went away while pairing: {e}", "io") from None
        if g is None:
            g = self._open_group(GroupRecord(name=group, role="primary", target=target,
                                             feeder=self.node.name, origin=self.node.name,
                                             journal_limit=limit,
                                             sync=sync))
        g.rec.state = "copying"
        self.save(g)
        prec = PairRecord(name=name, mode=mode, role=Role.PRIMARY, volume=r.name,
                          partner=target, partner_volume=target_volume, state=PairState.COPYING,
                          io_mode=Mode(vol.io_mode), gen_current=gen, copy_total=nchunks(r.size),
                          copy_source=self.node.name, group=group)
        mgr.store.save(prec)
        pr = mgr.load(prec)
        pr.dirty.set_all()
        await pr.dirty.sync(self.node.executor)
        self.node.events.publish("pair_created", pair=name, role="primary", partner=target,
                                 mode=mode, group=group)
        self.start_shipping(g)
        mgr.start_copy(pr)
        return prec

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
                    if pr.rec.state == "copying" and pr.rec.copy_source == self.node.name:
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
            rec.mode = "journal"
            link = self.mgr.link_or_none(rec.target)
            if link is not None:
                fut = link.request({"t": "jresume", "group": rec.name, "seq": rec.written,
                                    "time": rec.written_time})
                fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            rec.sent = rec.received = rec.applied = rec.written
            rec.applied_time = rec.written_time
            self.node.events.publish("journal_resumed", group=rec.name, seq=rec.written)
        rec.state = "mirrored"
        rec.reason = ""
        self.save(g)
        g.wake.set()

    # ---- views ---------------------------------------------------------------------------

    def view(self, pr: PairRuntime) -> dict[str, Any]:
        g = self.groups.get(pr.rec.group)
        return {} if g is None else group_view(g, self.node.name, time.time(),
                                               time.monotonic())
