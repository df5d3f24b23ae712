"""The far copy's guarantees, checked on the real node code (`realrun` with a far site C
fed by an asynchronous remote copy of the pair).

While C says its copy is consistent (its group `mirrored`), the copy must be a prefix
of the write order: C may hold a write only with every write acknowledged to a host
before that one was sent (the feeder numbers writes in the order it applies them, and a
write acknowledged earlier was applied earlier). After healing, C must be caught up and
equal to the pair.
"""

from __future__ import annotations

from collections.abc import Callable

from twinvol.node.node import Node
from twinvol.replication.core.types import GroupRole, GroupState
from twinvol.testing.history import Findings, Op

GROUP = "g"


def far_state(c: Node) -> tuple[GroupState, int, int] | None:
    """C's group state, applied and received counts (None: no group yet)."""
    g = c.replication.remote.groups.get(GROUP)
    if g is None or g.rec.role != GroupRole.SECONDARY:
        return None
    return g.rec.state, g.rec.applied, g.rec.received


class FarWatch:
    """Samples C's copy between simulated steps and judges the samples at the end."""

    def __init__(self, read: Callable[[], list[int] | None]) -> None:
        self.read = read          # C's block values while it says consistent, else None
        self.samples: list[tuple[float, list[int]]] = []

    def sample(self, now: float) -> None:
        values = self.read()
        if values is not None:
            self.samples.append((now, values))

    def check(self, log: list[Op], f: Findings) -> None:
        sent = {op.value: op.sent for op in log if op.kind == "w"}
        written = {op.value: op.block for op in log if op.kind == "w"}
        acked: dict[int, list[tuple[float, int]]] = {}
        for op in log:
            if op.kind == "w" and op.ok and op.answered is not None:
                acked.setdefault(op.block, []).append((op.answered, op.value))
        for at, values in self.samples:
            for block, value in enumerate(values):
                if value == 0:
                    continue
                if value < 0 or written.get(value) != block:
                    f.far.append(f"C at {at:.3f}: block {block} holds {value}, which no host "
                                 "wrote there")
                    continue
                before = sent[value]
                for other, held in enumerate(values):
                    need = max((v for t, v in acked.get(other, ()) if t < before), default=0)
                    if held < need:
                        f.far.append(
                            f"C at {at:.3f} says it is consistent but is not a prefix: block "
                            f"{block} holds {value}, block {other} holds {held}, though "
                            f"{need} was acknowledged before {value} was sent")
                        return

    @staticmethod
    def final(c: Node | None, c_values: list[int] | None, pair_values: list[int] | None,
              f: Findings) -> None:
        if c is None or c_values is None or pair_values is None:
            f.far.append("C is not running at the end")
            return
        state = far_state(c)
        if state is None or state[0] != GroupState.MIRRORED or state[1] != state[2]:
            f.far.append(f"C did not catch up after healing: (state, applied, received) "
                         f"= {state}")
        if c_values != pair_values:
            f.far.append(f"C differs from the pair at the end: {c_values} vs {pair_values}")
