"""The feeder of a remote copy: ships committed journal records to the far site in
sequence order (a window of batches in flight), learns what it received and applied
(which trims the journal), passes that on to the standby, completes sync-mode writes,
and watches that the copy keeps moving: a copy that stops says so and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from twinvol import clock
from twinvol.replication import remote_messages as rm
from twinvol.replication.core.stall import Stalled
from twinvol.replication.core.types import GroupRole, GroupState, JournalMode, Role
from twinvol.replication.messages import BadMessage
from twinvol.replication.peer import Message, PeerDown, PeerLink, RemoteError, forget
from twinvol.replication.ports import RemotePort
from twinvol.replication.runtime import GroupRuntime
from twinvol.storage.journal import JournalCorrupt

log = logging.getLogger("twinvol.remote")


BATCH_BYTES = 1024 * 1024
WINDOW = 4                 # journal batches in flight to the target
CHECKPOINT_EVERY = 0.3     # seconds between looks at the target's durable checkpoint
PROGRESS_EVERY = 0.3       # seconds between progress reports to the standby
CHECK_TARGET_FOR = 5.0     # after a restart, seconds a feeder holds hosts for its target


class Shipper:
    """Shipping for every group this node feeds."""

    def __init__(self, remote: RemotePort) -> None:
        self.remote = remote
        self.mgr = remote.mgr
        self.node = remote.node

    async def run(self, g: GroupRuntime) -> None:
        rec = g.rec
        window: list[asyncio.Future[Message]] = []
        while True:
            g.wake.clear()
            link = self.mgr.link_or_none(rec.target)
            if link is None or rec.state == "suspended" or rec.feeder != self.node.name \
                    or not self.serving(g):
                if g.waiters:
                    self.release_waiters(g, None)
                forget(window)
                window.clear()
                g.need_stat = True
                if link is not None and rec.feeder == self.node.name \
                        and rec.state != GroupState.SUSPENDED \
                        and clock.monotonic() - g.last_stat > 1.0:
                    await self.ask_while_idle(link, g)
                await self.idle(g, 0.3)
                continue
            try:
                if g.need_stat:
                    asked = g.failbacks
                    st = await self.stat(link, g)
                    if not self.still_feeder(g, st, asked):
                        continue
                    self.learn(g, st)
                    rec.sent = max(st.received, rec.applied)
                    g.need_stat = False
                committed = g.committed()
                if rec.mode != "journal" or rec.sent >= committed:
                    while window:
                        self.progress(g, rm.reply((await window.pop(0))[0], rm.Stat))
                    self.report_standby(g)
                    await self.idle(g, CHECKPOINT_EVERY)
                    if not g.wake.is_set() and (rec.applied < rec.sent
                                                or clock.monotonic() - g.last_stat > 1.0):
                        # Learn the target's next durable checkpoint (trims the journal),
                        # and whether it still takes records from here.
                        asked = g.failbacks
                        st = await self.stat(link, g)
                        if self.still_feeder(g, st, asked):
                            self.progress(g, st)
                    continue
                if rec.sent < g.journal.first - 1 or (g.journal.first == 0
                                                      and rec.sent < committed):
                    # The journal no longer holds what the target needs.
                    self.remote.overflow(g, f"the journal lacks sequence {rec.sent + 1}",
                                   event="remote_catch_up")
                    continue
                first = rec.sent + 1
                last, blob = g.journal.read_encoded(first, BATCH_BYTES, seq_to=committed)
                window.append(link.request(rm.encode(rm.Records(
                    rec.name, first=first, last=last, committed=committed,
                    written=rec.written, wtime=rec.written_time, at=clock.wall())), blob))
                rec.sent = last
                rec.bytes_shipped += len(blob)
                rec.records_shipped += last - first + 1
                if len(window) >= WINDOW:
                    self.progress(g, rm.reply((await window.pop(0))[0], rm.Stat))
                    self.report_standby(g)  # also while never idle (throttled)
            except JournalCorrupt as e:
                self.remote.suspend(g, f"journal record {e.seq + 1} failed its CRC check: nothing "
                                 "past it is shipped; resync the pair to repair the copy")
                self.node.events.publish("journal_corrupt", group=rec.name, seq=e.seq + 1)
            except RemoteError as e:
                forget(window)
                window.clear()
                if e.code == "corrupt":
                    self.remote.suspend(g, f"the target refused a damaged record: {e}")
                    self.node.events.publish("journal_corrupt", group=rec.name, error=str(e))
                else:
                    log.warning("journal shipping refused", extra={"group": rec.name,
                                                                   "error": str(e)})
                    g.need_stat = True
                    await asyncio.sleep(0.5)
            except PeerDown:
                forget(window)
                window.clear()
                g.need_stat = True
                if g.waiters:
                    self.release_waiters(g, None)
            except Exception as e:  # a bug must not stop the copy while status says mirrored
                log.exception("journal shipping failed", extra={"group": rec.name})
                forget(window)
                window.clear()
                g.need_stat = True
                self.stalled(g, Stalled(f"shipping failed: {type(e).__name__}: {e}"))
                await asyncio.sleep(1.0)

    async def stat(self, link: PeerLink, g: GroupRuntime) -> rm.Stat:
        """Ask the target for its numbers (and tell it what is committed)."""
        h, _ = await link.request(rm.encode(rm.StatRequest(
            g.rec.name, committed=g.committed(), written=g.rec.written,
            wtime=g.rec.written_time, at=clock.wall())))
        g.last_stat = clock.monotonic()
        return rm.reply(h, rm.Stat)

    async def ask_while_idle(self, link: PeerLink, g: GroupRuntime) -> None:
        """Not shipping (this active-active copy is blocked): still learn whether the far
        copy was taken over or is fed by another node, so the status tells the truth and
        a restarted node stops waiting for the answer."""
        asked = g.failbacks
        try:
            st = await self.stat(link, g)
        except (PeerDown, RemoteError, BadMessage) as e:
            log.info("far copy did not answer", extra={"group": g.rec.name, "error": str(e)})
            g.last_stat = clock.monotonic()
            return
        if self.still_feeder(g, st, asked):
            self.learn(g, st)

    def still_feeder(self, g: GroupRuntime, st: rm.Stat, asked: int) -> bool:
        """The target's view: taken over, or fed by another node since (DR)? `asked`: the
        failbacks done when the question left; an answer from before a failback ended
        (its `takeover` is over) must not suspend the group again."""
        if st.state == GroupState.TAKEOVER:
            if not g.failing_back and asked == g.failbacks:
                self.remote.taken_over(g)
            return False
        if st.feeder and st.feeder != self.node.name:
            self.demote(g, st.feeder)
            return False
        self.checked(g, "the far copy was not taken over")
        return True

    def check_after_restart(self, g: GroupRuntime) -> None:
        """Taken over while this node was down? Hosts wait until the target says (its
        first answer), or until it does not answer within CHECK_TARGET_FOR."""
        if not g.rec.hold:
            g.checking_until = clock.monotonic() + CHECK_TARGET_FOR
            for pr in g.pairs.values():
                self.mgr.hold(pr.rec.volume, f"asking the far copy at {g.rec.target} whether "
                                             "it was taken over")

    def checked(self, g: GroupRuntime, why: str) -> None:
        """A restarted feeder held hosts until its target answered: serve again."""
        if g.checking_until:
            g.checking_until = 0.0
            for pr in g.pairs.values():
                self.mgr.unhold(pr.rec.volume)
            log.info("hosts served again", extra={"group": g.rec.name, "why": why})

    @staticmethod
    def release_waiters(g: GroupRuntime, upto: int | None) -> None:
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

    async def idle(self, g: GroupRuntime, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(g.wake.wait(), timeout)

    def learn(self, g: GroupRuntime, st: rm.Stat) -> None:
        rec = g.rec
        rec.received = st.received
        if st.applied >= rec.applied:
            rec.applied = st.applied
            rec.applied_time = st.applied_time

    def progress(self, g: GroupRuntime, st: rm.Stat) -> None:
        """A reply from the target: it received/applied up to these sequence numbers."""
        self.learn(g, st)
        if g.waiters:
            self.release_waiters(g, g.rec.received)
        g.journal.trim(g.rec.applied)
        if clock.monotonic() - g.last_save > 0.5:
            self.remote.save(g)

    def report_standby(self, g: GroupRuntime) -> None:
        """Piggy-back the copy progress to the standby (when it changed, throttled)."""
        now = clock.monotonic()
        if now - g.last_progress < PROGRESS_EVERY:
            return
        g.last_progress = now
        self.remote.save(g)
        for pr in g.pairs.values():
            aa = self.mgr.by_volume.get(pr.rec.volume)
            if aa is None or aa.rec.mode != "active-active":
                continue
            link = self.mgr.link_or_none(aa.rec.partner)
            if link is None:
                continue
            fut = link.request(rm.encode(rm.Progress(
                g.rec.name, written=g.rec.written, wtime=g.rec.written_time,
                received=g.rec.received, applied=g.rec.applied, atime=g.rec.applied_time,
                state=g.rec.state, at=clock.wall())))
            forget([fut])
            return

    def watch(self, g: GroupRuntime) -> None:
        """A copy that stopped says so and catches up by itself (from dirty chunks)."""
        rec = g.rec
        if g.checking_until and clock.monotonic() > g.checking_until:
            self.checked(g, f"the far copy at {rec.target} did not answer: serving without "
                            "knowing whether it was taken over")
        if rec.state in ("suspended", "takeover") or rec.hold or not self.serving(g):
            g.progress.reset(clock.monotonic())
            return
        if g.undecided:
            # This copy serves again and was not resynced from its partner: the writes
            # that failed here stand on it, so their records ship.
            for seq in sorted(g.undecided):
                g.inflight.pop(seq, None)
            g.undecided.clear()
            g.wake.set()
        up = self.mgr.peers.is_up(rec.target)
        if rec.mode == "bitmap" and up:
            for pr in g.pairs.values():
                if pr.rec.state == "copying" and (pr.copy_task is None or pr.copy_task.done()):
                    log.warning("catch-up copy not running: restarting it",
                                extra={"group": rec.name, "pair": pr.rec.name})
                    pr.rec.copy_source = self.node.name
                    self.mgr.start_copy(pr)
        if g.ship_task is None or g.ship_task.done():
            self.remote.start_shipping(g)
        stalled = g.progress.observe(clock.monotonic(), written=rec.written,
                                     committed=g.committed(), sent=rec.sent,
                                     applied=rec.applied,
                                     oldest_inflight=next(iter(g.inflight), 0),
                                     target_up=up, streaming=rec.mode == "journal")
        if stalled is not None:
            self.stalled(g, stalled)

    def serving(self, g: GroupRuntime) -> bool:
        """May this node's copies feed the far copy? Not while an active-active copy of
        the group is blocked: its partner may be writing alone (under the same sequence
        numbers, as the standby does), so records and chunks from here may be stale."""
        for pr in g.pairs.values():
            aa = self.mgr.by_volume.get(pr.rec.volume)
            if aa is not None and aa.rec.mode == "active-active" and aa.rec.io_mode == "block":
                return False
        return True

    def stalled(self, g: GroupRuntime, stall: Stalled) -> None:
        log.error("far copy stalled", extra={"group": g.rec.name, "reason": stall.reason})
        g.progress.reset(clock.monotonic())
        self.remote.overflow(g, f"the copy stalled: {stall.reason}", event="remote_stalled",
                             drop_inflight=True)

    def demote(self, g: GroupRuntime, feeder: str) -> None:
        """Another node feeds the target now (a DR takeover while this node was away):
        become its standby. What this copy wrote that the target may lack is marked
        dirty; the records of the new feeder arrive with the mirrored writes."""
        rec = g.rec
        self.remote.mark_unapplied(g)
        g.journal.reset()
        g.inflight.clear()
        g.undecided.clear()
        old, rec.role, rec.feeder = rec.role, GroupRole.STANDBY, feeder
        rec.mode = JournalMode.BITMAP
        rec.bitmap_until = rec.seq_seen = rec.written = 0
        rec.state = GroupState.COPYING
        self.release_waiters(g, None)
        for pr in g.pairs.values():
            if pr.copy_task is not None:
                pr.copy_task.cancel()
            pr.rec.role = Role.STANDBY
            pr.rec.copy_source = ""
            self.mgr.save(pr)
        self.remote.save(g)
        self.node.events.publish("group_demoted", group=rec.name, feeder=feeder,
                                 previous=old)
        log.warning("remote copy fed by another node now",
                    extra={"group": rec.name, "feeder": feeder})
