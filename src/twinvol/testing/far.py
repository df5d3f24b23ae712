"""The far site in the simulator: an asynchronous remote copy of the pair's volume to C.

The model follows the real protocol (`replication/remote*.py`, `dr.py`). The feeder (A
at first) numbers every write it applies, keeps it in its journal, and ships a record
only once both active-active copies hold the write (committed) and only while its own
copy serves: a write that failed on a losing copy stays undecided until the copy serves
again (it ships) or is resynced from its partner (it is dropped). The standby journals
the feeder's mirrored writes under the same numbers, continues the numbering when it
writes alone, and marks in dirty blocks what it holds no record for. C applies records in
sequence order; a catch-up by blocks makes it inconsistent until records resume. A DR
takeover at the standby (`takeover`) feeds C from where it was.

What the run checks (`Findings.far`): while C says it is consistent its copy is a state
an active-active copy really had (never a mix that skipped a write); after healing C is
consistent and equal to the pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twinvol.replication.core import far
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.testing import messages as m
from twinvol.testing.sim import Clock, Network, Proc, Scheduler

FAR = "C"
JOURNAL_LIMIT = 24      # records a journal holds before the copy falls back to blocks
SHIP_EVERY = 0.05
STAT_AFTER = 1.0        # seconds without a word from C before asking where it is

Record = tuple[int, int, int]   # (sequence number, block, value)


@dataclass(slots=True)
class FarState:
    """What a node keeps on disk about the remote copy."""

    feeder: bool
    journal: list[Record] = field(default_factory=list)
    written: int = 0
    seq_seen: int = 0
    mode: str = "journal"          # journal | bitmap
    dirty: set[int] = field(default_factory=set)
    bitmap_until: int = 0


class PairNode(Protocol):
    """What the far side needs of the simulated node it belongs to (`node.SimNode`)."""

    name: str
    partner: str
    mode: Mode
    session: int | None
    options: Any
    disk: Any
    repl_wait: dict[int, Any]

    def local_now(self) -> float: ...

    def timer(self, local_when: float, fn: Callable[..., None], *args: Any) -> None: ...

    def send(self, dst: str, msg: object) -> None: ...

    def trace(self, line: str) -> None: ...


class FarSide:
    """One active-active node's part in the remote copy (feeder or standby)."""

    def __init__(self, node: PairNode, state: FarState) -> None:
        self.node = node
        self.s = state
        self.boot()

    def boot(self) -> None:
        s = self.s
        last = s.journal[-1][0] if s.journal else 0
        s.written = max(s.written, last)
        s.seq_seen = max(s.seq_seen, last)
        self.inflight: dict[int, None] = {}
        self.undecided: set[int] = set()
        self.sent = 0
        self.applied = 0
        self.c_consistent = False
        self.heard = self.node.local_now()
        self.asked = -STAT_AFTER
        self.need_stat = True
        self.chunks: set[int] = set()     # blocks sent in a catch-up, not yet answered
        self.taking_over = False
        self.node.timer(self.node.local_now() + SHIP_EVERY, self._tick)

    # ---- numbering (the write path) -----------------------------------------------------

    def _assign(self, block: int, value: int) -> int:
        s = self.s
        seq = s.written + 1
        s.written = seq
        if s.mode == "journal":
            if len(s.journal) >= JOURNAL_LIMIT:
                self._to_blocks("journal full", drop_inflight=False)
                s.dirty.add(block)
            else:
                s.journal.append((seq, block, value))
        else:
            s.dirty.add(block)
        return seq

    def on_primary_write(self, block: int, value: int) -> int:
        """This node applied a host write as the active-active primary: its number (0
        when this node is the standby), in flight until `commit` or `settle`."""
        s = self.s
        if s.feeder:
            seq = self._assign(block, value)
            self.inflight[seq] = None
            return seq
        alone, journaling = self.node.mode is Mode.LOCAL, s.mode == "journal"
        if self.node.options.far_numbering:
            step = far.standby_write(alone, journaling, s.seq_seen)
        else:   # the old rule (--far-stale-numbers): number alone from any count
            step = far.StandbyStep.NUMBER if alone and journaling else far.StandbyStep.MARK
        if step is far.StandbyStep.NUMBER:
            seq = s.seq_seen + 1    # the standby goes on numbering alone
            s.journal.append((seq, block, value))
            s.seq_seen = s.written = seq
            return 0
        if step is far.StandbyStep.TO_BLOCKS:   # the feeder numbers it: our count is stale
            self._unapplied_to_dirty()
            s.journal.clear()
            s.mode = "bitmap"
        s.dirty.add(block)
        s.bitmap_until = far.BITS_NEEDED
        return 0

    def commit(self, seq: int) -> None:
        self.inflight.pop(seq, None)

    def settle(self, seq: int, acknowledged: bool) -> None:
        if acknowledged or not self.node.options.far_settle:
            self.commit(seq)
        elif seq in self.inflight:
            self.undecided.add(seq)

    def committed(self) -> int:
        for seq in self.inflight:
            return seq - 1
        return self.s.written

    def on_mirrored(self, block: int, value: int, seq: int, copy: bool, j: int) -> None:
        """The partner's write (or resync block, `copy`) reached this node."""
        s = self.s
        if copy:
            s.dirty.add(block)
            if s.feeder:
                if s.mode == "journal":
                    self._to_blocks("resynced from the partner")
            else:   # numbers up to `j` are taken: never reuse them
                seq_seen, s.bitmap_until = far.after_copy_chunk(s.seq_seen, s.bitmap_until,
                                                                s.written, j)
                if self.node.options.far_numbering:
                    s.seq_seen = seq_seen
            return
        if s.feeder:
            self._assign(block, value)      # the partner writes; this node numbers
            return
        if far.standby_keeps(s.mode == "journal", s.seq_seen, seq):
            s.journal.append((seq, block, value))
        else:
            if s.mode == "journal":
                self._unapplied_to_dirty()
                s.journal.clear()
                s.mode = "bitmap"
            s.dirty.add(block)
            s.bitmap_until = max(s.bitmap_until, seq)
        s.seq_seen = max(s.seq_seen, seq)
        s.written = max(s.written, seq)

    def _unapplied_to_dirty(self) -> None:
        self.s.dirty.update(b for seq, b, _ in self.s.journal if seq > self.applied)

    def _to_blocks(self, reason: str, drop_inflight: bool = True) -> None:
        """Writes in flight stay counted unless this copy is resynced from its partner
        (or no longer feeds): C learns from `committed` when its blocks are safe."""
        self.node.trace(f"{self.node.name} far copy by blocks: {reason}")
        self._unapplied_to_dirty()
        self.s.journal.clear()
        self.s.mode = "bitmap"
        if drop_inflight:
            self.inflight.clear()
            self.undecided.clear()

    # ---- shipping (the feeder) ----------------------------------------------------------

    def _serving(self) -> bool:
        return self.node.mode is not Mode.BLOCK or not self.node.options.far_serving

    def _tick(self) -> None:
        now = self.node.local_now()
        self.node.timer(now + SHIP_EVERY, self._tick)
        s = self.s
        if not s.feeder:
            return
        if not self._serving():
            return
        if self.undecided:   # this copy serves again with its data standing
            for seq in self.undecided:
                self.inflight.pop(seq, None)
            self.undecided.clear()
        if self.need_stat or now - self.heard > STAT_AFTER:
            self.need_stat = True   # the answer tells where C is: ship from there
            s.dirty |= self.chunks  # unanswered blocks of a catch-up go again
            self.chunks.clear()
            if now - self.asked > STAT_AFTER:
                self.asked = now
                self.node.send(FAR, m.FarStatReq(self.node.name, self.committed()))
            return
        if s.mode == "journal":
            top = self.committed()
            recs = tuple(r for r in s.journal if self.sent < r[0] <= top)
            if recs:
                self.node.send(FAR, m.Records(self.node.name, recs, top))
                self.sent = recs[-1][0]
        elif not self.chunks:
            if s.dirty:
                for b in sorted(s.dirty):
                    self.node.send(FAR, m.Chunk(self.node.name, b, self.node.disk.copy[b]))
                self.chunks = set(s.dirty)
                s.dirty.clear()
            else:   # caught up: records resume after `written`
                s.journal.clear()
                s.mode = "journal"
                self.sent = s.written
                self.node.send(FAR, m.Resume(self.node.name, s.written))
        if self.node.session is not None:
            self.node.send(self.node.partner, m.Progress(self.node.session, self.applied,
                                                         self.c_consistent, s.written))

    def on_far(self, msg: object) -> None:
        """A reply from C."""
        if not isinstance(msg, m.FarStat):
            return
        s = self.s
        self.heard = self.node.local_now()
        if msg.feeder != self.node.name:
            if self.taking_over:
                return
            if s.feeder:
                self._demote(msg.feeder)
            return
        if self.taking_over:
            self._took_over(msg)
            return
        if self.need_stat or msg.gap:
            # Records lost on the way (C restarted) or a gap: ship again from C's point.
            self.need_stat = False
            self.sent = msg.applied
        self.applied = msg.applied
        self.c_consistent = msg.consistent
        self.chunks.discard(msg.chunk)
        s.journal = [r for r in s.journal if r[0] > msg.applied]

    def _demote(self, feeder: str) -> None:
        self.node.trace(f"{self.node.name} far copy fed by {feeder} now: standby")
        s = self.s
        self._to_blocks(f"{feeder} feeds the far copy")
        s.feeder = False
        s.bitmap_until = s.seq_seen = s.written = 0

    def on_progress(self, msg: m.Progress) -> None:
        """The feeder's word on how far C is (the standby trims and clears)."""
        s = self.s
        if s.feeder:
            return
        self.applied = msg.applied
        self.c_consistent = msg.consistent
        s.journal = [r for r in s.journal if r[0] > msg.applied]
        node = self.node
        s.bitmap_until = far.standby_bound(
            s.bitmap_until, node.mode is Mode.MIRROR and node.disk.state is PairState.MIRRORED,
            len(node.repl_wait), len(node.disk.dirty), msg.written)
        if far.standby_caught_up(msg.consistent, msg.applied, s.bitmap_until):
            s.dirty.clear()
            orders = node.disk.role is Role.PRIMARY
            if s.mode == "bitmap" and not s.journal and not orders:
                s.mode = "journal"
                if self.node.options.far_numbering:
                    s.seq_seen = max(s.seq_seen, msg.applied)

    # ---- disaster recovery at the standby ------------------------------------------------

    def takeover(self) -> None:
        """`dr takeover` here: the feeder is lost; feed C from where it was."""
        if self.s.feeder or self.taking_over:
            return
        self.taking_over = True
        self.node.send(FAR, m.NewFeeder(self.node.name))

    def _took_over(self, msg: m.FarStat) -> None:
        s = self.s
        self.taking_over = False
        received = msg.applied
        held = {r[0] for r in s.journal}
        chunked = msg.chunked if self.node.options.far_chunked else frozenset()
        # Blocks C got in a copy whose writes the lost feeder had not seen committed
        # may hold writes this node never had. They go again, from here.
        s.dirty |= chunked
        plan = far.takeover_plan(
            s.mode == "journal", s.seq_seen, received,
            all(q in held for q in range(received + 1, s.seq_seen + 1)), len(s.dirty),
            s.bitmap_until, msg.consistent, len(chunked))
        s.feeder = True
        self.need_stat = False
        self.sent = self.applied = received
        self.c_consistent = msg.consistent
        if plan.journal:
            s.written = max(s.seq_seen, received)
            s.dirty.clear()
            method = "journal"
        else:
            s.dirty.update(b for seq, b, _ in s.journal if seq > received)
            s.journal.clear()
            s.mode = "bitmap"
            s.written = max(s.written, received)
            method = "blocks"
        self.node.trace(f"{self.node.name} took over the far copy at {received} by {method}")


@dataclass(slots=True)
class FarDisk:
    copy: list[int]
    applied: int = 0
    consistent: bool = True
    feeder: str = "A"
    chunked: set[int] = field(default_factory=set)   # blocks a catch-up brought
    chunked_until: int = 0     # ... which may hold writes up to here, not yet committed


class SimTarget(Proc):
    """C: applies records in sequence order; says whether its copy is consistent."""

    def __init__(self, clock: Clock, sched: Scheduler, net: Network, blocks: int,
                 check: Callable[[SimTarget], None], marks_catch_up: bool = True) -> None:
        super().__init__(FAR, clock, sched)
        self.net = net
        self.marks_catch_up = marks_catch_up
        self.disk = FarDisk([0] * blocks)
        self.check = check

    def boot(self) -> None:
        self.alive = True

    def _committed(self, committed: int) -> None:
        d = self.disk
        if far.chunk_bits_close(d.consistent, committed, d.chunked_until):
            d.chunked.clear()

    def receive(self, src: str, msg: object) -> None:
        d = self.disk
        chunk, gap = -1, False
        if isinstance(msg, m.NewFeeder):
            d.feeder = msg.node
        elif getattr(msg, "feeder", None) != d.feeder:
            pass        # the sender learns from the answer that it no longer feeds
        elif isinstance(msg, m.FarStatReq):
            self._committed(msg.committed)
        elif isinstance(msg, m.Records):
            for seq, block, value in msg.recs:
                if seq <= d.applied:
                    continue
                if seq != d.applied + 1:
                    gap = True
                    break
                d.copy[block] = value
                d.applied = seq
            self._committed(msg.committed)
            if d.consistent:
                self.check(self)
        elif isinstance(msg, m.Chunk):
            d.consistent = not self.marks_catch_up  # (the old behaviour kept saying so)
            d.chunked.add(msg.block)   # durable before the block is written
            d.copy[msg.block] = msg.value
            chunk = msg.block
            if d.consistent:
                self.check(self)
        elif isinstance(msg, m.Resume):
            d.applied = msg.seq
            d.consistent = True
            d.chunked_until = msg.seq   # its blocks may hold writes up to here
            self.check(self)
        self.net.send(FAR, src, m.FarStat(d.applied, d.consistent, d.feeder, chunk, gap,
                                          frozenset(d.chunked)))
