"""Disaster recovery of remote copies: takeover at a surviving site and failback.

`takeover` runs where hosts must continue: at the standby (the active-active partner
of a lost primary) it makes that node feed the far copy from the sequence number the
far copy reached, shipping only the records it lacks (or only the dirty chunks when the
standby holds no records for them); at the far site (primary and standby both lost) it
serves hosts at the last applied sequence number and tracks every chunk changed after.
`failback` returns the original direction after a far-site takeover with a delta copy:
the chunks the far site changed since, plus those the original primary wrote after the
far copy's recovery point.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import msgspec

from twinvol import clock
from twinvol.replication import remote_messages as rm
from twinvol.replication.bitmap import CHUNK, chunks_of, nchunks
from twinvol.replication.core import far
from twinvol.replication.core.types import GroupRole, GroupState, JournalMode, Role
from twinvol.replication.messages import BadMessage
from twinvol.replication.pairs import fork_generation
from twinvol.replication.peer import Message, PeerDown, RemoteError
from twinvol.replication.ports import RemotePort
from twinvol.replication.runtime import GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.journal import JournalError
from twinvol.storage.volumes import VolumeError

R = TypeVar("R", bound=msgspec.Struct)
log = logging.getLogger("twinvol.dr")


class DisasterRecovery:
    """The DR commands and the peer messages they exchange, for one node."""

    def __init__(self, remote: RemotePort) -> None:
        self.remote = remote
        self.mgr = remote.mgr
        self.node = remote.node

    def on_failback(self, peer: str, msg: rm.Failback, bits: Payload) -> Message:
        """Far site after a takeover: stop serving hosts and send back what differs."""
        g = self.remote.group_of(msg.group)
        if g.rec.role != "secondary" or g.rec.state != "takeover":
            raise RemoteError(f"group {g.rec.name!r} on node {self.node.name} was not taken "
                              "over", "conflict")
        if peer != g.rec.feeder:
            raise RemoteError(f"group {g.rec.name!r} was fed by {g.rec.feeder}, not {peer}",
                              "conflict")
        pr = g.pairs.get(msg.pair)
        if pr is None:
            raise RemoteError(f"no pair {msg.pair!r} in group {g.rec.name!r}", "not_found")
        changed = pr.dirty.count()
        pr.dirty.merge(bits)
        pr.dirty.sync_now()
        self.mgr.hold(pr.rec.volume, f"failback to {peer} running: use {peer}")
        pr.rec.copy_source = self.node.name
        self.mgr.set_state(pr, "copying", f"failback to {peer}")
        self.mgr.start_copy(pr)
        return rm.encode(rm.FailbackReply(changed=changed, chunks=pr.dirty.count())), b""

    def failback_copied(self, pr: PairRuntime) -> None:
        """Far site: one pair's reverse copy is done; when all are, hand the group back."""
        g = self.remote.groups.get(pr.rec.group)
        if g is None:
            return
        if pr.dirty.count():
            asyncio.get_running_loop().call_soon(self.mgr.start_copy, pr)
            return
        self.mgr.set_state(pr, "mirrored", "")
        if any(p.rec.state == "copying" for p in g.pairs.values()):
            return
        link = self.mgr.link_or_none(g.rec.feeder)
        if link is None:
            return
        # A far copy again from this step on (before anything else on the link is handled):
        # the feeder's next jstat must not see `takeover` any more.
        rec = g.rec
        rec.state = GroupState.MIRRORED
        rec.reason = ""
        for p in g.pairs.values():
            p.rec.copy_source = ""
            self.mgr.set_mode(p, "block", "far copy again: failback done")
            self.mgr.unhold(p.rec.volume)
        self.remote.save(g)
        fut = link.request(rm.encode(rm.FailbackDone(g.rec.name, received=rec.received)))

        def done(f: asyncio.Future[Message]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning("failback hand-back failed", extra={"group": g.rec.name})
                return
            try:
                back = rm.reply(f.result()[0], rm.FailbackDoneReply)
            except BadMessage as e:
                log.warning("failback hand-back answered badly",
                            extra={"group": g.rec.name, "error": str(e)})
                return
            g.journal.reset()
            rec.received = rec.applied = back.seq
            rec.applied_time = back.time
            rec.written = max(rec.written, rec.received)
            self.remote.checkpoint_now(g)
            self.node.events.publish("dr_failback_done", group=rec.name, to=rec.feeder)

        fut.add_done_callback(done)

    def failback_done(self, msg: rm.FailbackDone) -> Message:
        """Original primary: the far copy's data is here; records flow from here again."""
        g = self.remote.group_of(msg.group)
        rec = g.rec
        rec.written = max(rec.written, g.journal.last, msg.received)
        g.journal.reset()
        rec.mode = JournalMode.JOURNAL
        rec.sent = rec.received = rec.applied = rec.written
        rec.applied_time = rec.written_time = clock.wall()
        rec.state = GroupState.MIRRORED
        rec.reason = ""
        rec.hold = False
        g.failing_back = False
        g.failbacks += 1
        self.remote.save(g)
        for pr in g.pairs.values():
            pr.dirty.clear_all()
            pr.dirty.sync_now()
            self.mgr.set_state(pr, "mirrored", "")
            self.mgr.unhold(pr.rec.volume)
        self.node.events.publish("dr_failback_done", group=rec.name, at=self.node.name)
        g.need_stat = True
        g.wake.set()
        return rm.encode(rm.FailbackDoneReply(seq=rec.written, time=rec.applied_time)), b""

    def on_new_feeder(self, peer: str, msg: rm.NewFeeder) -> Message:
        """DR takeover at the standby: it feeds this target from now on."""
        g = self.remote.group_of(msg.group)
        if g.rec.role != "secondary":
            raise RemoteError(f"node {self.node.name} is not the target of group "
                              f"{g.rec.name!r}", "conflict")
        if g.rec.state == "takeover":
            raise RemoteError(f"group {g.rec.name!r} was taken over at {self.node.name}",
                              "conflict")
        old = g.rec.feeder
        g.rec.feeder = peer
        for pr in g.pairs.values():
            pr.rec.partner = peer
            self.mgr.save(pr)
        self.remote.save(g)
        self.node.events.publish("group_feeder", group=g.rec.name, feeder=peer, previous=old)
        return rm.stat_reply(g.rec)

    async def takeover(self, force: bool = False) -> list[dict[str, Any]]:
        """Run at a surviving site: every group this node can feed or serve, recovered."""
        out = []
        for g in list(self.remote.groups.values()):
            if g.rec.role == "standby":
                out.append(await self._takeover_standby(g, force))
            elif g.rec.role == "secondary":
                out.append(await self._takeover_target(g, force))
        if not out:
            raise VolumeError(f"node {self.node.name} holds no remote copy (no async pair has "
                              "a copy here): nothing to take over", "not_found")
        return out

    async def _takeover_standby(self, g: GroupRuntime, force: bool) -> dict[str, Any]:
        """The primary is lost: feed the target from here, shipping only what it lacks."""
        mgr, rec = self.mgr, g.rec
        if mgr.peers.is_up(rec.feeder) and not force:
            raise VolumeError(f"node {rec.feeder} still feeds group {rec.name!r} (its peer "
                              "link is up); takeover is for when it is lost", "conflict")
        for pr in g.pairs.values():
            aa = mgr.by_volume.get(pr.rec.volume)
            if aa is not None and aa.rec.io_mode == "block":
                raise VolumeError(f"volume {pr.rec.volume!r} on node {self.node.name} is "
                                  f"blocked (stale copy: {aa.rec.reason}); it cannot feed "
                                  "the remote copy", "conflict")
        h, _ = await self.ask(rec.target, rm.NewFeeder(rec.name),
                              f"node {rec.target} (the remote copy) is not connected")
        st = self.answer(h, rm.Stat)
        received = st.received
        rec.applied = st.applied
        rec.applied_time = st.applied_time
        j = g.journal
        holds_gap = rec.seq_seen <= received or j.holds(received + 1, rec.seq_seen)
        # Chunks the far copy got from a copy or catch-up whose writes the lost feeder had
        # not yet seen committed may hold writes this node never had: they go again.
        chunked = 0
        for pr in g.pairs.values():
            rh, got = await self.ask(rec.target, rm.BitsRequest(rec.name, pair=pr.rec.name),
                                     f"node {rec.target} (the remote copy) is not connected")
            if (n := self.answer(rh, rm.BitsReply).chunks):
                chunked += n
                pr.dirty.merge(got)
                await pr.dirty.sync(self.node.executor)
        bits = sum(pr.dirty.count() for pr in g.pairs.values())
        plan = far.takeover_plan(rec.mode == JournalMode.JOURNAL, rec.seq_seen, received,
                                 holds_gap, bits, rec.bitmap_until,
                                 st.state == GroupState.MIRRORED, chunked)
        rec.role = GroupRole.PRIMARY
        old_feeder, rec.feeder = rec.feeder, self.node.name
        rec.sent = received
        rec.received = received
        for pr in g.pairs.values():
            pr.rec.role = Role.PRIMARY
            pr.rec.copy_source = self.node.name
            mgr.save(pr)
        report: dict[str, Any] = {"group": rec.name, "node": self.node.name,
                                  "action": "feed", "previous_feeder": old_feeder,
                                  "target": rec.target, "target_received": received,
                                  "target_applied": rec.applied,
                                  "recovery_point_time": rec.applied_time}
        if plan.journal:
            delta_recs = max(0, j.last - received)
            delta_bytes = sum(j.index[s][2] for s in range(received + 1, j.last + 1))
            rec.written = max(rec.seq_seen, received)
            if not bits:
                pass
            else:
                for pr in g.pairs.values():
                    pr.dirty.clear_all()
                    await pr.dirty.sync(self.node.executor)
            report.update(method="journal", records=delta_recs, bytes=delta_bytes,
                          full_copy=False)
            rec.state = GroupState.MIRRORED
        else:
            # Bitmap catch-up: dirty chunks plus the chunks of every record past the target.
            self.remote.mark_unapplied(g, received + 1)
            j.reset()
            rec.mode = JournalMode.BITMAP
            rec.written = max(rec.written, received)
            chunks = sum(pr.dirty.count() for pr in g.pairs.values())
            total = sum(nchunks(pr.vol.record.size) for pr in g.pairs.values())
            report.update(method="bitmap", chunks=chunks, bytes=chunks * CHUNK,
                          full_copy=chunks >= total, why=plan.reason)
            rec.state = GroupState.COPYING
            for pr in g.pairs.values():
                if pr.dirty.count():
                    mgr.set_state(pr, "copying", f"takeover at {self.node.name}: "
                                                 "catching the far copy up by chunks")
                    mgr.start_copy(pr)
        g.delta = report
        self.remote.save(g)
        for pr in g.pairs.values():
            self.remote.feeds[pr.rec.volume] = g
        self.node.events.publish("dr_takeover", **report)
        self.remote.start_shipping(g)
        g.wake.set()
        return report

    @staticmethod
    def answer(h: dict[str, Any], kind: type[R]) -> R:
        """A typed reply; a malformed one fails the operator's command with the reason."""
        try:
            return rm.reply(h, kind)
        except BadMessage as e:
            raise VolumeError(str(e), "io") from None

    async def ask(self, peer: str, msg: rm.RemoteMsg, unreachable: str,
                  within: float = 5.0) -> Message:
        """One request for an operator command, riding out a link that is just being
        re-established (a site that was frozen or restarted a moment ago)."""
        deadline = clock.monotonic() + within
        while True:
            link = self.mgr.link_or_none(peer)
            if link is not None:
                try:
                    reply: Message = await link.request(rm.encode(msg))
                    return reply
                except PeerDown:
                    pass
            if clock.monotonic() > deadline:
                raise VolumeError(unreachable, "io")
            await asyncio.sleep(0.1)

    async def _takeover_target(self, g: GroupRuntime, force: bool) -> dict[str, Any]:
        """Both the primary and the standby are lost: serve hosts from the far copy."""
        mgr, rec = self.mgr, g.rec
        if rec.state == "takeover":
            return {"group": rec.name, "node": self.node.name, "action": "none",
                    "reason": "already taken over"}
        if mgr.peers.is_up(rec.feeder) and not force:
            raise VolumeError(f"node {rec.feeder} still feeds group {rec.name!r} (its peer "
                              "link is up); take over there or stop it first", "conflict")
        if rec.state == "copying" and not force:
            raise VolumeError(f"the copy of group {rec.name!r} on node {self.node.name} is "
                              "inconsistent (its initial copy or catch-up had not finished): "
                              "refusing to serve it (--force to serve it anyway)", "conflict")
        self.remote.checkpoint_now(g)
        lost = max(0, rec.written - rec.applied)
        # C knows only what the feeder reported before it went silent: `lost` is a lower
        # bound, exact up to `known_until` (when the feeder sent its last word, its clock).
        known = g.heard_sent or None
        report = {"group": rec.name, "node": self.node.name, "action": "serve",
                  "recovery_point": {"sequence": rec.applied, "time": rec.applied_time},
                  "lost": {"sequences": lost, "last_written": rec.written,
                           "seconds": round(max(0.0, rec.written_time - rec.applied_time), 3)
                           if lost else 0.0,
                           "lower_bound": True,
                           "known_until": round(known, 3) if known is not None else None}}
        rec.state = GroupState.TAKEOVER
        rec.reason = f"taken over at {self.node.name}"
        for pr in g.pairs.values():
            fork_generation(pr.rec)
            pr.dirty.clear_all()
            await pr.dirty.sync(self.node.executor)
            mgr.set_state(pr, "takeover", rec.reason)
            mgr.set_mode(pr, "local", rec.reason)
            self.remote.feeds.pop(pr.rec.volume, None)
        g.delta = report
        self.remote.save(g)
        self.node.events.publish("dr_takeover", **report)
        return report



    async def _return_feed(self, g: GroupRuntime) -> dict[str, Any]:
        """Failback after a takeover at the standby: this node, the original primary, is
        back and mirrored with it again: it feeds the far copy again (only what the far
        copy lacks) and orders writes again (the active-active roles are swapped back)."""
        pairs = []
        for pr in g.pairs.values():
            aa = self.mgr.by_volume.get(pr.rec.volume)
            if aa is None or aa.rec.mode != "active-active" or aa.rec.state != "mirrored":
                raise VolumeError(f"volume {pr.rec.volume!r} on node {self.node.name} is not "
                                  "mirrored with its active-active partner yet; wait for its "
                                  "resync, then fail back", "conflict")
            pairs.append(aa)
        report = await self._takeover_standby(g, force=True)
        for aa in pairs:
            if aa.rec.role != "primary":
                await self.mgr.swap(aa.rec.name)
        report.update(action="return", chunks=report.get("chunks", 0),
                      bytes=report.get("bytes", 0), recovery_point=report["target_received"],
                      **{"from": report["previous_feeder"]})
        return report

    async def _take_pairs_back(self, g: GroupRuntime) -> None:
        """Before the far copy's data comes back here: its active-active partner holds data
        older than the far copy's, so it must be down now (chunks written here would not
        reach it while the pair says mirrored), and it must resync from here when it
        returns: this copy takes the primary role with a new generation, durably."""
        for pr in g.pairs.values():
            aa = self.mgr.by_volume.get(pr.rec.volume)
            if aa is None or aa.rec.mode != "active-active":
                continue
            if self.mgr.peers.is_up(aa.rec.partner):
                raise VolumeError(
                    f"node {aa.rec.partner}, the active-active partner of volume "
                    f"{pr.rec.volume!r}, is up: its copy is older than the far copy's. Stop it, "
                    f"fail back, then start it again: it resyncs from {self.node.name}",
                    "conflict")
            # The chunks the failback brings mark this pair dirty as they land (`on_copied`);
            # with the partner's own dirty bits, sent when they meet, that is what differs.
            fork_generation(aa.rec)
            aa.rec.role = Role.PRIMARY
            self.mgr.save(aa)

    async def failback(self) -> list[dict[str, Any]]:
        """Run at the original primary once it is back: the far copy sends back every chunk
        it changed since its takeover plus every chunk this copy changed after the far copy's
        recovery point (those must be rolled back to the far copy's data), then records flow
        from here again. Returns one report per group."""
        out = []
        mgr, node, remote = self.mgr, self.node, self.remote
        for g in list(remote.groups.values()):
            rec = g.rec
            if rec.role == "standby" and rec.origin == node.name:
                out.append(await self._return_feed(g))
                continue
            if rec.role != "primary" or rec.feeder != node.name:
                continue
            h, _ = await self.ask(rec.target, rm.StatRequest(rec.name),
                                  f"node {rec.target} (the far copy of group {rec.name!r}) is "
                                  "not connected")
            st = self.answer(h, rm.Stat)
            link = mgr.link_or_none(rec.target)
            if st.state != GroupState.TAKEOVER or link is None:
                continue
            await self._take_pairs_back(g)
            remote.taken_over(g)
            g.failing_back = True
            # Before the first request: the far copy may finish (and say so) before the
            # last request's answer is back here.
            rec.state = GroupState.COPYING
            rec.reason = f"failback from {rec.target} running"
            remote.save(g)
            applied = st.applied
            extra: dict[str, set[int]] = {name: set() for name in g.pairs}
            try:
                for r in g.journal.iter_from(max(applied + 1, g.journal.first or applied + 1)):
                    if r.pair in extra:
                        extra[r.pair].update(chunks_of(r.offset, r.length))
            except JournalError as e:
                raise VolumeError(f"group {rec.name!r}: cannot read this node's journal ({e}); "
                                  "the changes after the far copy's recovery point are unknown",
                                  "io") from None
            report: dict[str, Any] = {"group": rec.name, "node": node.name, "from": rec.target,
                                      "recovery_point": applied, "pairs": {}}
            for name, pr in g.pairs.items():
                chunks = set(pr.dirty.iter_set()) | extra[name]
                bits = bytearray(len(pr.dirty.bits))
                for c in chunks:
                    bits[c >> 3] |= 1 << (c & 7)
                mine = len(chunks)
                r, _ = await link.request(rm.encode(rm.Failback(rec.name, pair=name)),
                                          bytes(bits))
                back = self.answer(r, rm.FailbackReply)
                report["pairs"][name] = {"changed_here": mine, "changed_there": back.changed,
                                         "chunks": back.chunks, "bytes": back.chunks * CHUNK}
            report["chunks"] = sum(p["chunks"] for p in report["pairs"].values())
            report["bytes"] = report["chunks"] * CHUNK
            g.delta = report
            remote.save(g)
            node.events.publish("dr_failback", **{k: v for k, v in report.items() if k != "pairs"})
            out.append(report)
        if not out:
            raise VolumeError(f"node {node.name} has no remote copy that was taken over: nothing "
                              "to fail back", "not_found")
        return out
