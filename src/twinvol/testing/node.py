"""A simulated storage node holding one side of an active-active pair.

It runs the real core (`PeerLease` for the right to serve, `PartnerLoss` for what to do
when the partner is lost, `compare` and `meeting` when the sides meet again) and models
around it what the asyncio manager does with sockets and files: the peer connection
with its silence timer, the mirrored write (the primary applies, sends, and acknowledges
once the partner has it; the secondary forwards to the primary), the resync copy, and a
restart that keeps only what is on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twinvol.replication.core import states
from twinvol.replication.core.decide import (
    AskWitness,
    Effect,
    GoAlone,
    PartnerLoss,
    Phase,
    SetMode,
    Suspend,
)
from twinvol.replication.core.generations import Meeting, compare, meeting
from twinvol.replication.core.lease import LeaseConfig, PeerLease
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.testing import messages as m
from twinvol.testing.far import FAR, FarSide, FarState
from twinvol.testing.sim import Clock, Network, Proc, Scheduler

PING_EVERY = 0.5
DEAD_AFTER = 2.0
RPC_TIMEOUT = 1.0
WITNESS = "W"


@dataclass(slots=True)
class Disk:
    """What survives a kill -9: the copy, the pair record and the dirty bits."""

    copy: list[int]
    role: Role
    mode: Mode
    state: PairState = PairState.MIRRORED
    gen: str = "g0"
    history: list[str] = field(default_factory=list)
    dirty: set[int] = field(default_factory=set)
    copy_source: str = ""
    far: FarState | None = None   # this node's part in the remote copy to C


# Who waits for a write: a host client (name, request id) or the partner (forwarded id).
Origin = tuple[str, int]


@dataclass(slots=True)
class SimOptions:
    """Switches that put back old behaviour, so the simulator can show it finds it (and
    `one_way`, more faults: kept apart so the schedules of the kept seeds stay the same)."""

    leases: bool = True           # mirrored copies serve only under the partner's lease
    fence_alone: bool = True      # a write acknowledged alone waits until the partner is fenced
    meeting_inflight: bool = True  # a meeting counts mirrored writes still in flight as dirty
    skip_when_up: bool = True     # a write that failed on an old link starts no decision
    far: bool = True              # an async remote copy of the pair to a far site C
    far_chunked: bool = True      # a takeover copies again what an unfinished catch-up sent
    far_settle: bool = True       # a write failed on a losing copy is not shipped
    far_serving: bool = True      # a feeder whose copy is blocked ships nothing
    far_inconsistent: bool = True  # a catch-up block makes the far copy inconsistent
    far_numbering: bool = True    # a standby never numbers its writes from a stale count
    one_way: bool = False         # the nemesis also cuts links in one direction only


class SimNode(Proc):
    def __init__(self, name: str, partner: str, clock: Clock, sched: Scheduler, net: Network,
                 disk: Disk, lease_config: LeaseConfig, options: SimOptions,
                 on_alone: Callable[[SimNode], None], trace: Callable[[str], None]) -> None:
        super().__init__(name, clock, sched)
        self.partner = partner
        self.net = net
        self.disk = disk
        self.lease_config = lease_config
        self.options = options
        self.on_alone = on_alone
        self.trace = trace
        self.split_brain = False
        self.gens = 0
        self.state_hook: Callable[[SimNode], None] | None = None
        self.boot(fresh=True)

    # ---- life cycle ------------------------------------------------------------------

    def boot(self, fresh: bool = False) -> None:
        now = self.local_now()
        self.alive = True
        self.lease = PeerLease.after_start(self.lease_config, now)
        self.session: int | None = None
        self.hello = 0
        self.last_heard = now
        self.loss: PartnerLoss | None = None
        self.witness_rid = 0
        self.missing: list[tuple[Origin, int]] = []  # with the far copy's number (0: none)
        self.repl_wait: dict[int, tuple[Origin, int, int]] = {}   # origin, block, number
        self.failing: list[tuple[Origin, int, int]] = []  # lost with the link, not yet handled
        self.fwd_wait: dict[int, Origin] = {}
        self.copying = False
        self.rid = 0
        if not fresh:  # until the partner is met a restarted copy serves nothing
            self.disk.dirty.update(range(len(self.disk.copy)))  # the activity log
            self.mode = Mode.LOCAL if self.disk.mode is Mode.LOCAL else Mode.BLOCK
            self.timer(now + DEAD_AFTER + 0.5, self._after_restart)
        else:
            self.mode = self.disk.mode
        self._apply_mode()
        self.far = None if self.disk.far is None else FarSide(self, self.disk.far)
        self.timer(now + self.net.rng.uniform(0, PING_EVERY), self._tick)
        self.timer(now + self.lease_config.renew_every, self._lease_tick)
        self.timer(now + 0.5, self._heartbeat)

    def _send(self, dst: str, msg: object) -> None:
        self.net.send(self.name, dst, msg)

    send = _send

    def on_state(self) -> None:
        """This copy changed: the far copy may later hold exactly this state."""
        if self.state_hook is not None:
            self.state_hook(self)

    def _new_rid(self) -> int:
        self.rid += 1
        return self.rid

    # ---- modes and the right to serve -------------------------------------------------

    def set_mode(self, mode: Mode, reason: str, save: bool = True) -> None:
        if mode is not self.mode:
            self.trace(f"{self.name} mode {self.mode} -> {mode}: {reason}")
        self.mode = mode
        if save:
            self.disk.mode = mode
        self._apply_mode()

    def _apply_mode(self) -> None:
        if self.mode is Mode.MIRROR:
            self.lease.resume()
            self._request_lease()
        else:
            self.lease.drop()
            if self.mode is Mode.LOCAL:
                self.lease.revoke()

    def serving(self, now: float) -> bool:
        if self.mode is Mode.LOCAL:
            return True
        if self.mode is Mode.MIRROR:
            return not self.options.leases or self.lease.valid(now)
        return False

    def may_write_alone(self, now: float) -> bool:
        return not self.options.fence_alone or self.lease.may_act_alone(now)

    def _request_lease(self) -> None:
        if self.session is not None and self.options.leases:
            self._send(self.partner, m.LeaseReq(self.session, self.lease.request(self.local_now())))

    def _lease_tick(self) -> None:
        if self.mode is Mode.MIRROR:
            self._request_lease()
        self.timer(self.local_now() + self.lease_config.renew_every, self._lease_tick)

    # ---- the peer connection -----------------------------------------------------------

    def _tick(self) -> None:
        now = self.local_now()
        if self.session is not None:
            if now - self.last_heard > DEAD_AFTER:
                self._down("partner silent")
            else:
                self._send(self.partner, m.Ping(self.session))
        if self.session is None and self.name < self.partner:
            self.hello = self.incarnation * 1_000_000 + self._new_rid()
            self._send(self.partner, m.Hello(self.hello))
        self.timer(now + PING_EVERY, self._tick)

    def _up(self, session: int) -> None:
        self.session = session
        self.last_heard = self.local_now()
        self.trace(f"{self.name} peer link up (session {session})")
        if self.loss is not None:
            self._end_loss()
        if self.mode is Mode.MIRROR:
            self._request_lease()
        if self.name < self.partner:
            self._send(self.partner, self._state_msg(reply=False))

    def _down(self, reason: str) -> None:
        if self.session is None:
            return
        self.trace(f"{self.name} peer link down: {reason}")
        self.session = None
        self.copying = False
        # As in asyncio, the failures of writes in flight on the dead link are handled a
        # moment later, possibly after a new link's first messages.
        failing = list(self.repl_wait.values())
        self.repl_wait.clear()
        if failing:
            self.failing += failing
            self.timer(self.local_now() + self.net.rng.uniform(0.0002, 0.004),
                       self._writes_failed, failing)
        for origin in self.fwd_wait.values():
            self._answer(origin, False)
        self.fwd_wait.clear()
        self._partner_lost(reason)

    def receive(self, src: str, msg: object) -> None:
        if src == WITNESS:
            if isinstance(msg, m.ArbitrateRep) and self.loss is not None \
                    and msg.rid == self.witness_rid:
                self.witness_rid = 0
                self._drive(self.loss.on_verdict(msg.verdict, self.local_now(), "",
                                                 msg.retry_after))
            return
        if src == FAR:
            if self.far is not None:
                self.far.on_far(msg)
            return
        if src != self.partner:
            self._host(src, msg)
            return
        if isinstance(msg, m.Hello):
            if self.session is not None and self.session != msg.session:
                self._down("the partner reconnected")
            if self.session != msg.session:
                self._send(self.partner, m.HelloAck(msg.session))  # before anything else
                self._up(msg.session)
            return
        if isinstance(msg, m.HelloAck):
            if self.session is None and msg.session == self.hello:
                self._up(msg.session)
            return
        session = getattr(msg, "session", None)
        if session != self.session:
            if not isinstance(msg, m.Reset):
                self._send(self.partner, m.Reset(session or 0))
            return
        self.last_heard = self.local_now()
        self._peer(msg)

    def _peer(self, msg: object) -> None:
        now = self.local_now()
        assert self.session is not None
        if isinstance(msg, m.Reset):
            self._down("reset by the partner")
        elif isinstance(msg, m.LeaseReq):
            self._send(self.partner, m.LeaseRep(self.session, msg.seq, self.lease.grant(now)))
        elif isinstance(msg, m.LeaseRep):
            self.lease.on_reply(msg.seq, msg.granted)
        elif isinstance(msg, m.Repl):
            self.disk.copy[msg.block] = msg.value
            self.on_state()
            if self.far is not None:
                self.far.on_mirrored(msg.block, msg.value, msg.seq, msg.rid == 0, msg.j)
            if msg.rid:
                self._send(self.partner, m.ReplAck(self.session, msg.rid))
        elif isinstance(msg, m.ReplAck):
            waiting = self.repl_wait.pop(msg.rid, None)
            if waiting is not None:
                if self.far is not None:
                    self.far.commit(waiting[2])
                self._answer(waiting[0], True)
        elif isinstance(msg, m.Progress):
            if self.far is not None:
                self.far.on_progress(msg)
        elif isinstance(msg, m.Fwd):
            self._write((self.partner, msg.rid), msg.block, msg.value)
        elif isinstance(msg, m.FwdAck):
            origin = self.fwd_wait.pop(msg.rid, None)
            if origin is not None:
                self._answer(origin, msg.ok)
        elif isinstance(msg, m.PairStateMsg):
            if not msg.reply:
                self._send(self.partner, self._state_msg(reply=True))
            self._reconcile(msg)
        elif isinstance(msg, m.PairDone):
            self._pair_done(msg)
        elif isinstance(msg, m.PairDoneAck):
            self._copy_done(msg)

    # ---- host I/O ----------------------------------------------------------------------

    def _host(self, client: str, msg: object) -> None:
        now = self.local_now()
        if isinstance(msg, m.Read):
            ok = self.serving(now)
            self._send(client, m.IoReply(msg.rid, ok, self.disk.copy[msg.block] if ok else 0))
        elif isinstance(msg, m.Write):
            self._write((client, msg.rid), msg.block, msg.value)

    def _answer(self, origin: Origin, ok: bool) -> None:
        who, rid = origin
        if who == self.partner:
            if self.session is not None:
                self._send(who, m.FwdAck(self.session, rid, ok))
            return
        self._send(who, m.IoReply(rid, ok))

    def _write(self, origin: Origin, block: int, value: int) -> None:
        now = self.local_now()
        if not self.serving(now):
            self._answer(origin, False)
            return
        if self.disk.role is Role.SECONDARY:
            if origin[0] == self.partner or self.session is None:
                self._answer(origin, False)
                return
            rid = self._new_rid()
            self.fwd_wait[rid] = origin
            self._send(self.partner, m.Fwd(self.session, rid, block, value))
            return
        replicating = self.mode is Mode.MIRROR or (self.copying and self.session is not None)
        self.disk.copy[block] = value
        self.on_state()
        seq = 0 if self.far is None else self.far.on_primary_write(block, value)
        if replicating and self.session is not None:
            rid = self._new_rid()
            self.repl_wait[rid] = (origin, block, seq)
            self._send(self.partner, m.Repl(self.session, rid, block, value, seq))
            return
        self.disk.dirty.add(block)
        self.missing.append((origin, seq))
        if replicating:
            self._partner_lost("partner lost during a mirrored write")
        else:
            self._settle_missing()

    def _writes_failed(self, batch: list[tuple[Origin, int, int]]) -> None:
        for item in batch:
            if item in self.failing:
                self.failing.remove(item)
                self.disk.dirty.add(item[1])
                self.missing.append((item[0], item[2]))
        self._partner_lost("partner lost during a mirrored write")

    def _settle_missing(self) -> None:
        """Writes that reached only this copy: acknowledged once this side may act alone
        (partner fenced), failed if it may not."""
        if self.loss is not None or not self.missing:
            return
        now = self.local_now()
        if self.mode is Mode.LOCAL and not self.may_write_alone(now):
            self.lease.revoke()
            self.timer(self.lease.granted_until, self._settle_missing)
            return
        missing, self.missing = self.missing, []
        alone = self.mode is Mode.LOCAL
        if alone:
            self.on_alone(self)
        for origin, seq in missing:
            if self.far is not None:
                self.far.settle(seq, alone)
            self._answer(origin, alone)

    # ---- partner loss (core/decide.py) --------------------------------------------------

    def _partner_lost(self, reason: str, restart: bool = False) -> None:
        if self.options.skip_when_up and self.session is not None and not restart:
            # A write failed on a link already replaced by a new one: the meeting on
            # the new link reconciles the copies (the chunk is dirty); no decision.
            self._settle_missing()
            return
        if self.loss is None and (self.mode is Mode.MIRROR or restart):
            self.loss = PartnerLoss(self.lease, self.disk.role, self.mode)
            self._drive(self.loss.start(self.local_now(), reason))
        else:
            self._settle_missing()

    def _after_restart(self) -> None:
        if self.mode is Mode.BLOCK and self.session is None \
                and self.disk.state in (PairState.MIRRORED, PairState.SUSPENDED):
            self._partner_lost("partner unreachable after restart", restart=True)

    def _drive(self, effects: list[Effect]) -> None:
        loss = self.loss
        assert loss is not None
        for e in effects:
            if isinstance(e, SetMode):
                self.set_mode(e.mode, e.reason)
            elif isinstance(e, Suspend):
                self.set_state(PairState.SUSPENDED)
            elif isinstance(e, GoAlone):
                if e.fork:
                    self.gens += 1
                    self.disk.history = [self.disk.gen, *self.disk.history]
                    self.disk.gen = f"{self.name}{self.incarnation}.{self.gens}"
                    self.disk.role = Role.PRIMARY
                self.set_mode(Mode.LOCAL, e.reason)
                self.set_state(PairState.SUSPENDED)
            elif isinstance(e, AskWitness):
                self.witness_rid = self._new_rid()
                self._send(WITNESS, m.Arbitrate(self.witness_rid, self.name, self.partner,
                                                self.disk.role, self.disk.gen))
                self.timer(self.local_now() + RPC_TIMEOUT, self._witness_timeout,
                           self.witness_rid)
        if loss.done:
            self._end_loss()
        elif loss.phase is Phase.WAITING and self.session is not None:
            self._end_loss()  # the partner is back: meeting it decides
        else:
            when = loss.next_timer()
            if when is not None:
                self.timer(when, self._loss_timer, loss)

    def _end_loss(self) -> None:
        self.loss = None
        self.witness_rid = 0
        self._settle_missing()

    def _loss_timer(self, loss: PartnerLoss) -> None:
        if self.loss is loss:
            self._drive(loss.handle_timer(self.local_now()))

    def _witness_timeout(self, rid: int) -> None:
        if self.loss is not None and self.witness_rid == rid:
            self.witness_rid = 0
            self._drive(self.loss.on_witness_error(self.local_now(), "no answer"))

    def _heartbeat(self) -> None:
        self._send(WITNESS, m.Heartbeat(self.name))
        self.timer(self.local_now() + 0.5, self._heartbeat)

    # ---- meeting again and the resync copy ----------------------------------------------

    def _state_msg(self, reply: bool) -> m.PairStateMsg:
        d = self.disk
        assert self.session is not None
        dirty = set(d.dirty)
        if self.options.meeting_inflight:  # applied here; the partner may lack them
            dirty.update(b for _, b, _n in self.repl_wait.values())
            dirty.update(b for _, b, _n in self.failing)
        return m.PairStateMsg(self.session, reply, d.gen, tuple(d.history), d.role, d.state,
                              self.mode, frozenset(dirty))

    def set_state(self, state: PairState) -> None:
        """Through the node's own state table: a transition it lacks fails the run."""
        states.check("sim", self.disk.state, state)
        self.disk.state = state

    def _reconcile(self, peer: m.PairStateMsg) -> None:
        d = self.disk
        plan = meeting(compare(d.gen, d.history, peer.gen, peer.history),
                       d.role is Role.PRIMARY)
        if plan is Meeting.STOP:
            self.split_brain = True
            self.set_mode(Mode.BLOCK, "split brain")
            return
        if plan is Meeting.SEND:
            d.dirty |= peer.dirty
            d.role = Role.PRIMARY
            if self.mode is Mode.BLOCK:
                self._fence_then_copy(self.session)
            else:
                self._start_copy()

    def _fence_then_copy(self, session: int | None) -> None:
        if session != self.session or self.session is None:
            return
        if not self.lease.partner_fenced(self.local_now()):
            self.timer(self.lease.revoke(), self._fence_then_copy, session)
            return
        self.set_mode(Mode.LOCAL, "resync source")
        self._start_copy()

    def _start_copy(self) -> None:
        if self.copying or self.session is None:
            return
        self.copying = True
        self.disk.copy_source = self.name
        j = 0 if self.far is None else self.far.s.written
        for block in sorted(self.disk.dirty):
            self._send(self.partner, m.Repl(self.session, 0, block, self.disk.copy[block], 0, j))
        self.lease.resume()  # the partner serves from the moment it is mirrored
        seq = self.lease.request(self.local_now())
        partner_role = Role.SECONDARY if self.disk.role is Role.PRIMARY else Role.PRIMARY
        self._send(self.partner, m.PairDone(self.session, self.disk.gen,
                                            tuple(self.disk.history), partner_role, seq))

    def _pair_done(self, msg: m.PairDone) -> None:
        d = self.disk
        d.gen, d.history, d.role = msg.gen, list(msg.history), msg.role
        d.dirty.clear()
        d.copy_source = ""
        self.set_state(PairState.MIRRORED)
        self.set_mode(Mode.MIRROR, "resync done")
        self._send(WITNESS, m.Release(self.name))
        assert self.session is not None
        self._send(self.partner, m.PairDoneAck(self.session, msg.lease_seq,
                                               self.lease.grant(self.local_now())))

    def _copy_done(self, msg: m.PairDoneAck) -> None:
        if not self.copying:
            return
        self.copying = False
        self.lease.on_reply(msg.lease_seq, msg.granted)
        d = self.disk
        d.dirty.clear()
        d.copy_source = ""
        self.set_state(PairState.MIRRORED)
        self.set_mode(Mode.MIRROR, "resync done")
        self._send(WITNESS, m.Release(self.name))

