"""Host clients that log every request, and the checker that judges the log.

Each block has one writer, which writes it again only after the previous write was
answered, with values that only grow; so a block's acknowledged writes are ordered by
value, and a read is *stale* when it returns a value below the newest write
acknowledged before the read was sent (the consistency issue's rule).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from twinvol.testing import messages as m
from twinvol.testing.sim import Clock, Network, Proc, Scheduler

TIMEOUT = 10.0  # a request unanswered this long counts as failed (outcome unknown)


@dataclass(slots=True)
class Op:
    client: str
    node: str
    kind: str          # "r" or "w"
    block: int
    sent: float
    value: int = 0     # written, or read back
    answered: float | None = None
    ok: bool = False


@dataclass(slots=True)
class Findings:
    stale: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    divergent: list[str] = field(default_factory=list)
    alone: list[str] = field(default_factory=list)   # wrote alone while the partner served
    other: list[str] = field(default_factory=list)   # split brain, no convergence
    far: list[str] = field(default_factory=list)     # the far copy: a mix, or not caught up

    def total(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in
                ("stale", "lost", "corrupt", "divergent", "alone", "other", "far")}


class Client(Proc):
    """A host that spreads requests over both nodes, like the host agent."""

    def __init__(self, name: str, index: int, nclients: int, blocks: int, nodes: tuple[str, ...],
                 sched: Scheduler, net: Network, rng: random.Random, values: list[int],
                 log: list[Op]) -> None:
        super().__init__(name, Clock(0.0, 1.0), sched)
        self.mine = [b for b in range(blocks) if b % nclients == index]
        self.blocks = blocks
        self.nodes = nodes
        self.net = net
        self.rng = rng
        self.values = values  # one shared counter: values grow across all clients
        self.log = log
        self.out: dict[int, Op] = {}
        self.writing: set[int] = set()
        self.rid = 0
        self.running = True
        self.timer(rng.uniform(0, 0.05), self._next)

    def _next(self) -> None:
        if not self.running:
            return
        free = [b for b in self.mine if b not in self.writing]
        now = self.sched.now
        node = self.rng.choice(self.nodes)
        if free and self.rng.random() < 0.4:
            block = self.rng.choice(free)
            self.values[0] += 1
            op = Op(self.name, node, "w", block, now, self.values[0])
            self.writing.add(block)
        else:
            op = Op(self.name, node, "r", self.rng.randrange(self.blocks), now)
        self.rid += 1
        self.out[self.rid] = op
        self.log.append(op)
        msg: object = (m.Write(self.rid, op.block, op.value) if op.kind == "w"
                       else m.Read(self.rid, op.block))
        self.net.send(self.name, node, msg)
        self.timer(now + TIMEOUT, self._timeout, self.rid)
        self.timer(now + self.rng.uniform(0.005, 0.03), self._next)

    def _done(self, rid: int) -> Op | None:
        op = self.out.pop(rid, None)
        if op is not None and op.kind == "w":
            self.writing.discard(op.block)
        return op

    def _timeout(self, rid: int) -> None:
        self._done(rid)

    def receive(self, src: str, msg: object) -> None:
        if not isinstance(msg, m.IoReply):
            return
        op = self._done(msg.rid)
        if op is None:
            return
        op.answered = self.sched.now
        op.ok = msg.ok
        if op.kind == "r" and msg.ok:
            op.value = msg.value


def check(log: list[Op], final: dict[str, list[int]], f: Findings) -> None:
    """Judge a history: stale and corrupt reads, and lost or divergent blocks at the end."""
    written: dict[int, set[int]] = {}
    acked: dict[int, list[tuple[float, int]]] = {}
    for op in log:
        if op.kind == "w":
            written.setdefault(op.block, set()).add(op.value)
            if op.ok and op.answered is not None:
                acked.setdefault(op.block, []).append((op.answered, op.value))
    for lst in acked.values():
        lst.sort()
    for op in log:
        if op.kind != "r" or not op.ok:
            continue
        if op.value and op.value not in written.get(op.block, ()):
            f.corrupt.append(f"read of block {op.block} at {op.sent:.4f} from {op.node} "
                             f"returned {op.value}, which nobody wrote")
            continue
        newest = max((v for t, v in acked.get(op.block, ()) if t < op.sent), default=0)
        if op.value < newest:
            f.stale.append(f"read of block {op.block} sent at {op.sent:.4f} to {op.node} "
                           f"returned {op.value}, but {newest} was acknowledged before")
    names = sorted(final)
    for block in sorted(set(acked) | set(range(len(final[names[0]])))):
        newest = max((v for _, v in acked.get(block, ())), default=0)
        seen = {n: final[n][block] for n in names}
        if len(set(seen.values())) > 1:
            f.divergent.append(f"block {block} differs at the end: {seen}")
        for n, v in seen.items():
            if v < newest:
                f.lost.append(f"block {block} on {n} holds {v} at the end, but {newest} "
                              "was acknowledged")
