"""What a node does when the partner of its pairs is lost, and when it comes back.

Loss: the decision runs the core's `PartnerLoss` machine (core/decide.py): stop granting
leases, block a secondary, ask the witness, fence the partner, then go alone. Return:
the side with the lower name leads the meeting; both compare generations
(`resync_direction`) and the newer side copies what differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from twinvol import clock
from twinvol.replication.bitmap import extent_chunks
from twinvol.replication.core.decide import Effect as LossEffect
from twinvol.replication.core.decide import GoAlone, PartnerLoss, Phase, SetMode, Suspend
from twinvol.replication.core.generations import Meeting, compare, meeting
from twinvol.replication.core.types import Mode, Role, Verdict
from twinvol.replication.leases import Leases
from twinvol.replication.messages import BadMessage, PairStateMsg, decode_reply, encode
from twinvol.replication.pairs import PairRecord, fork_generation
from twinvol.replication.peer import DEAD_AFTER, Message, PeerDown, RemoteError
from twinvol.replication.ports import ManagerPort
from twinvol.replication.runtime import PairRuntime
from twinvol.replication.wire import Payload
from twinvol.witness.client import WitnessError
from twinvol.witness.logic import Decision

log = logging.getLogger("twinvol.replication")


class Partners:
    def __init__(self, mgr: ManagerPort, leases: Leases,
                 on_peer_up: Callable[[str], None]) -> None:
        self.mgr = mgr
        self.leases = leases
        self.on_peer_up = on_peer_up  # remote copy resumes its links too

    def partner_lost(self, pr: PairRuntime, reason: str, *, restart: bool = False) -> None:
        if pr.decide_task is not None and not pr.decide_task.done():
            return
        if not restart and self.mgr.peers.is_up(pr.rec.partner):
            # A write failed on a link that a new one already replaced: the meeting on
            # the new link reconciles the copies (the chunk is dirty). A decision now
            # would stop granting the partner leases and could block this copy for
            # good, both sides then serving nothing.
            return
        if pr.rec.io_mode != "mirror" and pr.rec.state != "copying" and not restart:
            return
        pr.decide_task = asyncio.ensure_future(self.decide(pr, reason))

    async def after_restart(self) -> None:
        """Pairs whose partner stays away after our restart get a decision like a link loss."""
        await asyncio.sleep(DEAD_AFTER + 0.5)
        for pr in list(self.mgr.pairs.values()):
            if pr.rec.io_mode == "block" and not self.mgr.peers.is_up(pr.rec.partner) \
                    and not pr.rec.remote \
                    and pr.rec.state in ("mirrored", "suspended", "copying"):
                self.partner_lost(pr, f"partner {pr.rec.partner} unreachable after restart",
                                      restart=True)

    async def decide(self, pr: PairRuntime, reason: str) -> None:
        """Drive the partner-loss machine (core/decide.py): ask the witness, fence the
        partner, then act on the outcome."""
        rec = pr.rec
        loss = PartnerLoss(pr.lease, Role(rec.role), Mode(rec.io_mode),
                           copying=rec.state == "copying",
                           copy_source=rec.copy_source == self.mgr.node.name)
        self.apply_loss(pr, loss.start(clock.monotonic(), reason))
        while not loss.done:
            if loss.asking:
                try:
                    d = await self.mgr.decide(rec)
                except WitnessError as e:  # unreachable or refused: never write alone
                    effects = loss.on_witness_error(clock.monotonic(), str(e))
                else:
                    effects = loss.on_verdict(Verdict(d.decision), clock.monotonic(), d.reason,
                                              d.retry_after)
            else:
                when = loss.next_timer()
                if when is not None:
                    await asyncio.sleep(max(0.0, when - clock.monotonic()))
                effects = loss.handle_timer(clock.monotonic())
            self.apply_loss(pr, effects)
            if loss.phase is Phase.WAITING and self.mgr.peers.is_up(rec.partner):
                return  # the partner is back: meeting it decides instead

    def apply_loss(self, pr: PairRuntime, effects: list[LossEffect]) -> None:
        rec = pr.rec
        for e in effects:
            if isinstance(e, SetMode):
                self.mgr.set_mode(pr, e.mode, e.reason)
            elif isinstance(e, Suspend):
                self.mgr.set_state(pr, "suspended", e.reason)
            elif isinstance(e, GoAlone):
                if e.fork:
                    fork_generation(rec)
                    if rec.role == "secondary":
                        rec.role = Role.PRIMARY
                        self.mgr.node.events.publish("pair_takeover", pair=rec.name)
                self.mgr.set_mode(pr, "local", e.reason)
                self.mgr.set_state(pr, "suspended" if e.fork else "copying", e.reason)

    async def ask_witness(self, rec: PairRecord) -> Decision:
        d: Decision = await self.mgr.witness.arbitrate(rec.name, self.mgr.node.name, rec.partner,
                                                   rec.role, rec.gen_current)
        return d

    async def heartbeats(self) -> None:
        reported = False
        while True:
            try:
                await self.mgr.witness.heartbeat(self.mgr.node.name)
                if reported:
                    self.mgr.node.events.publish("witness_reachable")
                reported = False
            except WitnessError as e:
                if not reported:
                    self.mgr.node.events.publish("witness_unreachable", error=str(e))
                reported = True
            await asyncio.sleep(0.5)

    async def no_witness(self, rec: PairRecord) -> Decision:
        """Without a witness, the primary continues and the secondary blocks."""
        if rec.role == "primary":
            return Decision("continue", self.mgr.node.name, "no witness: the primary continues")
        return Decision("block", rec.partner, "no witness: the secondary stops")

    def on_down(self, peer: str, reason: str) -> None:
        self.mgr.node.events.publish("peer_down", peer=peer, reason=reason)
        for pr in list(self.mgr.pairs.values()):
            if pr.rec.partner == peer and not pr.rec.remote:
                self.partner_lost(pr, f"peer link to {peer} down: {reason}")

    def on_refused(self, peer: str, reason: str) -> None:
        self.mgr.node.events.publish("peer_refused", peer=peer, reason=reason)

    def on_up(self, peer: str) -> None:
        self.mgr.node.events.publish("peer_up", peer=peer)
        self.on_peer_up(peer)
        for pr in list(self.mgr.pairs.values()):
            if pr.rec.partner != peer or pr.rec.remote:
                continue
            if pr.decide_task is not None and not pr.decide_task.done():
                pr.decide_task.cancel()
            if self.mgr.node.name < peer:  # one side leads the exchange; the other answers
                self.mgr.spawn(self.meet(pr))

    async def meet(self, pr: PairRuntime) -> None:
        """Partner is back: compare generations; the newer side sends what differs."""
        rec = pr.rec
        if pr.decide_task is not None and not pr.decide_task.done():
            pr.decide_task.cancel()
        link = self.mgr.link_or_none(rec.partner)
        if link is None:
            return
        try:
            h, peer_bits = await link.request(encode(self.state_of(pr)), self.changed(pr))
            theirs = decode_reply(h, PairStateMsg)
        except (PeerDown, RemoteError, BadMessage) as e:
            log.warning("pair state exchange failed", extra={"pair": rec.name, "error": str(e)})
            return
        await self.reconcile(pr, theirs, peer_bits)

    @staticmethod
    def changed(pr: PairRuntime) -> bytes:
        """The chunks this copy may hold differently from its partner, for a meeting:
        the dirty bits, plus the activity-log extents of mirrored writes still in flight
        (applied here; whether the partner has them is not known yet; their failure
        would mark them dirty only after the meeting)."""
        for ext, count in pr.al_inflight.items():
            if count > 0:
                pr.dirty.set_many(extent_chunks(ext, pr.vol.record.size))
        return bytes(pr.dirty.bits)

    @staticmethod
    def state_of(pr: PairRuntime) -> PairStateMsg:
        rec = pr.rec
        return PairStateMsg(rec.name, rec.gen_current, list(rec.gen_history),
                         "primary" if rec.role == "primary" else "secondary", rec.state,
                         rec.io_mode, rec.copy_source, rec.rebooted)

    async def reconcile(self, pr: PairRuntime, theirs: PairStateMsg,
                        peer_bits: Payload) -> None:
        rec = pr.rec
        if rec.state == "copying" or theirs.state == "copying":
            source = rec.copy_source or theirs.copy_source
            if source == self.mgr.node.name:
                self.mgr.start_copy(pr)
            return
        cmp = compare(rec.gen_current, rec.gen_history, theirs.gen, theirs.history)
        log.info("generations compared", extra={"pair": rec.name, "rule": int(cmp.rule),
                                                "direction": str(cmp.direction),
                                                "why": cmp.why})
        # Same data generation: only chunks touched around a crash can differ; the
        # primary sends them (from both sides' bitmaps).
        plan = meeting(cmp, rec.role == "primary", rec.rebooted, theirs.rebooted)
        if plan is Meeting.STOP:
            self.mgr.set_mode(pr, "block", f"split brain: {cmp.why}")
            self.mgr.set_state(pr, "suspended", f"split brain (rule {int(cmp.rule)}): "
                               f"{cmp.why}; resolve with `twinvol pair resync NAME "
                               "--from NODE`")
            return
        if plan is Meeting.SEND:
            pr.dirty.merge(peer_bits)
            if theirs.rebooted:
                # The partner's machine restarted: its disk may have lost mirrored writes
                # still in its page cache, which this side's activity log covers.
                for ext in list(pr.al.iter_set()):
                    pr.dirty.set_many(extent_chunks(ext, pr.vol.record.size))
            rec.role = Role.PRIMARY
            if rec.io_mode == "block":
                # Neither side continued alone (e.g. both restarted): this side serves.
                await self.leases.fence_partner(pr)
                self.mgr.set_mode(pr, "local", "resync source")
            self.mgr.start_copy(pr)
        # from_peer: the partner runs the copy towards us; we stay blocked until done.

    def on_pair_state(self, pr: PairRuntime, theirs: PairStateMsg,
                      peer_bits: Payload) -> Message:
        reply = (encode(self.state_of(pr)), self.changed(pr))
        self.mgr.spawn(self.reconcile(pr, theirs, peer_bits))
        return reply
