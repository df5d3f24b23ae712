"""The standby of a remote copy: the active-active partner of the feeder. It journals
the feeder's mirrored writes under the same sequence numbers, so that if the feeder is
lost it can feed the far copy from where that copy was (a delta, never a full copy).
What it holds no record for (its partner wrote alone, a resync, a full journal) its dirty
chunks stand for, until the far copy has applied past them.
"""

from __future__ import annotations

import logging

from twinvol import clock
from twinvol.nbd.constants import Cmd
from twinvol.replication import remote_messages as rm
from twinvol.replication.bitmap import nchunks
from twinvol.replication.core import far
from twinvol.replication.core.types import GroupRole, GroupState, JournalMode, Mode, PairState, Role
from twinvol.replication.pairs import PairRecord
from twinvol.replication.peer import Message, RemoteError
from twinvol.replication.ports import RemotePort
from twinvol.replication.runtime import GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.journal import JournalError

log = logging.getLogger("twinvol.remote")



class Standby:
    """The standby role of every consistency group on this node."""

    def __init__(self, remote: RemotePort) -> None:
        self.remote = remote
        self.mgr = remote.mgr
        self.node = remote.node

    def write_alone(self, g: GroupRuntime, pr: PairRuntime, cmd: int, offset: int,
                       length: int, data: Payload | None, flags: int) -> int:
        """The standby writes as the active-active primary. When its partner (the feeder)
        is lost, it continues the journal itself: the target never holds a sequence number
        the standby lacks (records ship only once both copies have them), so the next
        number after the last one it journaled is free. Otherwise: dirty chunks."""
        rec = g.rec
        aa = self.mgr.by_volume.get(pr.rec.volume)
        alone = aa is not None and aa.rec.io_mode == "local"
        step = far.standby_write(alone, rec.mode == JournalMode.JOURNAL, rec.seq_seen,
                                 readable=g.journal.corrupt_at is None)
        if step is far.StandbyStep.NUMBER:
            seq = rec.seq_seen + 1
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length,
                                       clock.wall(),
                                       data if cmd == Cmd.WRITE and data else b"")
                rec.seq_seen = seq
                rec.written = max(rec.written, seq)
                return 0
            except JournalError as e:
                self.to_bitmap(g, f"standby journal: {e}")
        elif step is far.StandbyStep.TO_BLOCKS:
            # Mirrored with the feeder, which numbers this write without telling: from
            # here this node's last number is stale, so what it writes, now or alone
            # later, is tracked by dirty chunks, never by numbers the target may hold.
            self.to_bitmap(g, "writes as the active-active primary: the feeder numbers them")
        self.remote.mark(pr, offset, length)
        rec.bitmap_until = far.BITS_NEEDED
        return 0

    def on_write(self, volume: str, seq: int, cmd: int, offset: int, length: int,
                         data: Payload | None, flags: int) -> None:
        """A mirrored write with the primary's sequence number: keep the same record."""
        g = self.remote.feeds.get(volume)
        if g is None:
            return
        pr = self.remote.pair_of(g, volume)
        if g.rec.role != "standby":
            # We feed the target ourselves now (takeover): this write still needs a record.
            self.remote.on_applied(volume, cmd, offset, length, data, flags, committed=True)
            return
        rec = g.rec
        last = rec.seq_seen
        if far.standby_keeps(rec.mode == JournalMode.JOURNAL, last, seq):
            try:
                g.journal.append_write(seq, pr.rec.name, cmd, flags, offset, length,
                                       clock.wall(),
                                       data if cmd == Cmd.WRITE and data else b"")
                rec.seq_seen = seq
            except JournalError as e:
                self.to_bitmap(g, f"standby journal: {e}")
                self.remote.mark(pr, offset, length)
        else:
            if rec.mode == "journal":
                self.to_bitmap(g, f"sequence gap: {seq} after {last}")
            self.remote.mark(pr, offset, length)
        if rec.mode == "bitmap":
            # Covered by dirty chunks; the journal resumes after it once they are cleared.
            rec.bitmap_until = max(rec.bitmap_until, seq)
            rec.seq_seen = max(rec.seq_seen, seq)
        rec.written = max(rec.written, seq)

    def to_bitmap(self, g: GroupRuntime, reason: str) -> None:
        """The standby lacks records (its partner wrote alone, its journal filled): its
        dirty chunks stand for them until the target has applied past them. Not a fault
        of the far copy, which the feeder still serves."""
        self.remote.mark_unapplied(g)
        g.journal.reset()
        g.rec.mode = JournalMode.BITMAP
        self.remote.save(g)
        self.node.events.publish("standby_bitmap", group=g.rec.name, reason=reason)
        log.info("standby tracks dirty chunks", extra={"group": g.rec.name, "reason": reason})

    def on_progress(self, msg: rm.Progress) -> Message:
        g = self.remote.group_of(msg.group)
        rec = g.rec
        if rec.role != GroupRole.STANDBY:
            return {}, b""
        rec.written = max(rec.written, msg.written)
        rec.written_time = msg.wtime
        rec.received = msg.received
        rec.applied = msg.applied
        rec.applied_time = msg.atime
        rec.state = msg.state
        g.journal.trim(rec.applied)
        aas = [self.mgr.by_volume.get(p.rec.volume) for p in g.pairs.values()]
        pairs = [aa for aa in aas if aa is not None and aa.rec.mode == "active-active"]
        orders = any(aa.rec.role == "primary" for aa in pairs)
        if rec.bitmap_until == far.BITS_NEEDED:   # (the counts below cost a popcount)
            rec.bitmap_until = far.standby_bound(
                rec.bitmap_until,
                bool(pairs) and len(pairs) == len(aas) and all(
                    aa.rec.state == "mirrored" and aa.rec.io_mode == "mirror" for aa in pairs),
                sum(sum(aa.al_inflight.values()) for aa in pairs),
                sum(aa.dirty.count() for aa in pairs), msg.written)
        if rec.state in (GroupState.MIRRORED, GroupState.COPYING, GroupState.SUSPENDED):
            want = PairState(rec.state)
            for pr in g.pairs.values():
                if pr.rec.state != want:
                    self.mgr.set_state(pr, want, rec.reason)
        if far.standby_caught_up(rec.state == GroupState.MIRRORED, rec.applied,
                                 rec.bitmap_until):
            # The target has everything the dirty chunks stood for.
            for pr in g.pairs.values():
                pr.dirty.clear_all()
                self.mgr.spawn(pr.dirty.sync(self.node.executor))
            # (Not while this copy orders the writes: each would switch it back.)
            if rec.mode == "bitmap" and g.journal.last == 0 and not orders:
                rec.mode = JournalMode.JOURNAL
                # Numbers up to what the target applied are taken, whether this node saw
                # them as records or as copied chunks: its own go on after them.
                rec.seq_seen = max(rec.seq_seen, rec.applied)
        self.remote.save(g)
        return {}, b""

    def prepare(self, peer: str, msg: rm.StandbyPrepare) -> Message:
        """Active-active partner of the primary: keep records with the same numbers."""
        mgr = self.mgr
        name, vname = msg.pair, msg.volume
        if name in mgr.pairs:
            raise RemoteError(f"pair {name!r} already exists here", "conflict")
        vol = self.node.volumes.get(vname)
        g = self.remote.ensure_group(msg.group, GroupRole.STANDBY, msg.target, peer,
                                     msg.journal_limit)
        g.rec.written = max(g.rec.written, msg.written)
        # Until the initial copy is done the standby could only feed the target in full;
        # after it, its journal holds every write from here on.
        g.rec.bitmap_until = max(g.rec.bitmap_until, msg.written)
        self.remote.save(g)
        rec = PairRecord(name=name, mode="async", role=Role.STANDBY, volume=vol.record.name,
                         partner=msg.target, partner_volume=msg.target_volume,
                         state=PairState.COPYING, io_mode=Mode(vol.io_mode),
                         gen_current=msg.gen,
                         copy_total=nchunks(vol.record.size), group=g.rec.name)
        mgr.store.save(rec)
        pr = mgr.load(rec)
        pr.dirty.set_all()
        pr.dirty.sync_now()
        return {}, b""
