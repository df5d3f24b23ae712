"""The far site of a remote copy: it journals each batch of records before applying it,
applies records in sequence order across every volume of its consistency group, and
checkpoints what it applied, so its copy is always a crash-consistent point (a prefix
of the primary site's write order) and a restart redoes the journal from there.
"""

from __future__ import annotations

import logging

from twinvol import clock
from twinvol.replication import remote_messages as rm
from twinvol.replication.bitmap import nchunks
from twinvol.replication.core import far
from twinvol.replication.core.types import GroupRole, GroupState, Mode, PairState, Role
from twinvol.replication.pairs import PairRecord
from twinvol.replication.peer import Message, RemoteError
from twinvol.replication.ports import RemotePort
from twinvol.replication.runtime import UNKNOWN_END, GroupRecord, GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.journal import Journal, JournalCorrupt, JournalError, Record, decode_one

log = logging.getLogger("twinvol.remote")


class FarTarget:
    """The target role of every consistency group on this node."""

    def __init__(self, remote: RemotePort) -> None:
        self.remote = remote
        self.mgr = remote.mgr
        self.node = remote.node

    def sync_group(self, g: GroupRuntime) -> None:
        for pr in list(g.pairs.values()):
            pr.vol.store.flush()
        g.journal.sync()

    def checkpoint_now(self, g: GroupRuntime) -> None:
        self.sync_group(g)
        self.checkpoint_done(g)

    def checkpoint_done(self, g: GroupRuntime) -> None:
        g.rec.applied = g.rec.received
        self.remote.save(g)
        g.journal.trim(g.rec.applied)

    def redo(self, g: GroupRuntime) -> None:
        """After a restart, apply journaled records past the last checkpoint, in order."""
        rec = g.rec
        n = 0
        try:
            for r in g.journal.iter_from(max(rec.applied + 1, g.journal.first or 1)):
                self.apply_record(g, r)
                n += 1
        except JournalError as e:
            self.remote.suspend(g, f"receive journal: {e}")
        rec.received = max(rec.applied, g.journal.last)
        if n:
            self.checkpoint_now(g)
            log.info("journal redo", extra={"group": rec.name, "records": n})
            self.node.events.publish("journal_redo", group=rec.name, records=n,
                                     applied=rec.applied)

    def apply_record(self, g: GroupRuntime, r: Record) -> None:
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

    def heard(self, g: GroupRuntime, msg: rm.Fed) -> None:
        """A message from the feeder (or, at the standby, from the primary): it is alive,
        and a target learns how far it wrote and what is committed."""
        g.last_heard = clock.monotonic()
        if g.rec.role != GroupRole.SECONDARY:
            return
        # What the feeder knew when it sent this, not when it arrived (a paused target
        # reads old frames late): the takeover's count of lost writes is exact up to it.
        g.heard_sent = max(g.heard_sent, msg.at)
        if isinstance(msg, rm.StatRequest):
            g.rec.written = max(g.rec.written, msg.written)
            g.rec.written_time = max(g.rec.written_time, msg.wtime)
        written = getattr(msg, "written", 0)
        if g.rec.consistent_at == UNKNOWN_END and written > 0:
            # Whatever this copy had applied, the feeder had written it by now.
            g.rec.consistent_at = written
            self.remote.save(g)
        committed = getattr(msg, "committed", -1)
        if committed >= 0:
            self.committed(g, committed)

    def on_records(self, peer: str, msg: rm.Records, payload: Payload) -> Message:
        g = self.remote.group_of(msg.group)
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
            # Journal the whole run first (one write) and make it durable, then apply it
            # in order: after a crash or a power loss the redo re-applies from the journal
            # whatever the volume may have lost or torn. Without the sync, a power loss
            # could keep a later record's data in the volume while losing an earlier
            # one and the journal tail: the copy said consistent and was no prefix
            # (the simulator, seed 5042).
            g.journal.append_run(sizes, mv[start:start + sum(n for _, n in sizes)])
            g.journal.sync()
            for r in new:
                self.apply_record(g, r)
                rec.received = r.seq
        rec.written = max(rec.written, msg.written)
        rec.written_time = max(rec.written_time, msg.wtime)
        self.maybe_mirrored(g)
        g.checkpoint_due = True
        if error is not None:
            self.remote.suspend(g, f"journal record after {rec.received} failed its CRC check; "
                             "nothing past it was applied")
            self.node.events.publish("journal_corrupt", group=rec.name, seq=rec.received + 1)
            raise RemoteError(str(error), "corrupt")
        return rm.stat_reply(g.rec)

    def copied(self, pr: PairRuntime, upto: int, committed: int = -1) -> None:
        """Far site: a pair's initial copy (or catch-up) is complete; the group is a
        consistent copy once it also holds every record up to `upto`."""
        g = self.remote.groups.get(pr.rec.group)
        if g is None or g.rec.role != "secondary" or g.rec.state == "takeover":
            return
        g.rec.consistent_at = max(g.rec.consistent_at, upto)
        g.rec.bits_until = max(g.rec.bits_until, upto)
        g.rec.bits_open = True
        self.maybe_mirrored(g)
        self.remote.save(g)
        if committed >= 0:
            self.committed(g, committed)

    def maybe_mirrored(self, g: GroupRuntime) -> None:
        rec = g.rec
        if rec.state == "copying" and rec.received >= rec.consistent_at \
                and not any(p.rec.state == "copying" for p in g.pairs.values()):
            rec.state = GroupState.MIRRORED
            self.remote.save(g)

    def prepare(self, peer: str, msg: rm.TargetPrepare) -> Message:
        """Far-site side of async pair creation: a blocked volume with the same identity."""
        mgr = self.mgr
        name, vname, size = msg.pair, msg.volume, msg.size
        if name in mgr.pairs:
            raise RemoteError(f"pair {name!r} already exists here", "conflict")
        _vol, own = mgr.take_identity(name, vname, size, rm.encode(msg))
        g = self.remote.ensure_group(msg.group, GroupRole.SECONDARY, self.node.name, peer,
                                     msg.journal_limit)
        rec = PairRecord(name=name, mode=msg.mode, role=Role.SECONDARY, volume=vname,
                         partner=peer, partner_volume=msg.partner_volume,
                         state=PairState.COPYING, io_mode=Mode.BLOCK, gen_current=msg.gen,
                         copy_total=nchunks(size), own_identity=own, group=g.rec.name)
        g.rec.state = GroupState.COPYING
        self.remote.save(g)
        mgr.store.save(rec)
        mgr.load(rec)
        self.node.events.publish("pair_created", pair=name, role="secondary", partner=peer,
                                 mode=rec.mode)
        return {}, b""

    def resume(self, msg: rm.Resume) -> Message:
        """The feeder caught this copy up by chunks: records resume after `seq`."""
        g = self.remote.group_of(msg.group)
        g.journal.reset()
        g.rec.received = g.rec.applied = msg.seq
        g.rec.applied_time = msg.time
        g.rec.state = GroupState.MIRRORED
        # The chunks may hold writes up to `seq` that the standby does not have yet.
        g.rec.bits_until = max(g.rec.bits_until, msg.seq)
        g.rec.bits_open = True
        self.checkpoint_now(g)
        for pr in g.pairs.values():
            if pr.rec.state == "copying":
                self.mgr.set_state(pr, "mirrored")
        self.committed(g, msg.committed)
        return rm.stat_reply(g.rec)

    def committed(self, g: GroupRuntime, committed: int) -> None:
        """The feeder says every write up to `committed` is on both active-active copies:
        once that covers what the last copy's chunks may hold, their bits are closed."""
        if g.rec.bits_open and far.chunk_bits_close(g.rec.state == GroupState.MIRRORED,
                                                    committed, g.rec.bits_until):
            for pr in g.pairs.values():
                if pr.dirty.count():
                    pr.dirty.clear_all()
                    pr.dirty.sync_now()
            g.rec.bits_open = False
            self.remote.save(g)

    def on_chunk(self, pr: PairRuntime, peer: str, chunks: range) -> None:
        """The target accepts copy data only from the node that feeds it, and a chunk
        makes its copy inconsistent (chunks come in block order, not write order) until
        the feeder says records resume: recorded durably before the chunk is written, so
        a takeover never serves a copy in the middle of a catch-up as consistent. The
        chunk's dirty bit (durable too) tells a standby taking over mid-catch-up what
        this copy got that the standby may not have (`dr` asks with `jbits`)."""
        g = self.remote.groups.get(pr.rec.group)
        if g is None or g.rec.feeder != peer or g.rec.state == "takeover":
            raise RemoteError(f"node {self.node.name} takes copy data for group "
                              f"{pr.rec.group!r} only from its feeder "
                              f"{g.rec.feeder if g else '?'}, not {peer}", "conflict")
        if g.rec.state == "mirrored":
            reason = f"catching up from dirty chunks sent by {peer}"
            g.rec.state, g.rec.reason = GroupState.COPYING, reason
            self.remote.save(g)
            for other in g.pairs.values():
                self.mgr.set_state(other, "copying", reason)
        if pr.dirty.set_many(chunks):
            pr.dirty.sync_now()

    def bits(self, msg: rm.BitsRequest) -> Message:
        """A standby taking over asks what a catch-up brought here (dirty chunks)."""
        pr = self.remote.group_of(msg.group).pairs.get(msg.pair)
        if pr is None:
            raise RemoteError(f"no pair {msg.pair!r} in group {msg.group!r}", "not_found")
        return rm.encode(rm.BitsReply(chunks=pr.dirty.count())), bytes(pr.dirty.bits)


def refetch_damaged(rec: GroupRecord, journal: Journal) -> None:
    """The far site's receive journal is damaged (a flipped byte, a torn sector) or lost
    its tail: end it before the damaged record and fetch what follows again from the
    feeder, which keeps every record not durably applied here. Until then the volume may
    hold writes past what it received (applied before the crash; a flipped length field
    looks like a record cut short), so the copy is not consistent until it has received
    all the feeder had written when it next hears from it (`heard`)."""
    dropped = journal.drop_damaged() or journal.last + 1
    if journal.last < rec.applied:
        journal.reset()   # what it held is applied durably: the next record is new
    rec.state = GroupState.COPYING
    rec.reason = (f"receive journal damaged at sequence {dropped}: fetching the records "
                  "again from the feeder")
    rec.consistent_at = UNKNOWN_END
    log.warning("receive journal damaged: records fetched again from the feeder",
                extra={"group": rec.name, "from": dropped, "applied": rec.applied})
