"""The simulated witness: the real `Arbiter` behind a simulated process.

Holds are written to "disk" before an answer leaves, as the witness server does, so a
killed witness comes back with every decision it gave; liveness is learned again.
"""

from __future__ import annotations

import contextlib
from typing import Any

from twinvol.replication.core.types import Role, Verdict
from twinvol.testing import messages as m
from twinvol.testing.sim import Clock, Network, Proc, Scheduler
from twinvol.witness.logic import Arbiter, ArbitrateRequest, RequestError
from twinvol.witness.logic import Role as WitnessRole


class SimWitness(Proc):
    def __init__(self, name: str, nodes: tuple[str, ...], clock: Clock, sched: Scheduler,
                 net: Network, takeover_after: float) -> None:
        super().__init__(name, clock, sched)
        self.nodes = nodes
        self.net = net
        self.takeover_after = takeover_after
        self.saved: Any = None
        self.boot()

    def boot(self) -> None:
        self.alive = True
        self.arbiter = Arbiter(self.nodes, self.local_now(), self.takeover_after)
        if self.saved is not None:
            self.arbiter.restore(self.saved)

    def receive(self, src: str, msg: object) -> None:
        now = self.local_now()
        if isinstance(msg, m.Heartbeat):
            self.arbiter.heartbeat(msg.node, now)
        elif isinstance(msg, m.Release):
            with contextlib.suppress(RequestError):  # the partner holds it: nothing to do
                self.arbiter.release("vol", msg.node, now)
        elif isinstance(msg, m.Arbitrate):
            role: WitnessRole = "primary" if msg.role is Role.PRIMARY else "secondary"
            d = self.arbiter.arbitrate(ArbitrateRequest("vol", msg.node, msg.partner, role,
                                                        msg.generation), now)
            self.net.send(self.name, src, m.ArbitrateRep(msg.rid, Verdict(d.decision),
                                                        d.retry_after))
        self.saved = self.arbiter.snapshot()
