"""One seeded run: a pair A-B with a witness W and an asynchronous remote copy to a far
site C (`far.py`), hosts writing and reading through A and B, a nemesis of crashes,
pauses and cuts (C's too) and DR takeovers at the standby, then healing and the verdict.

`run(seed)` is deterministic: the same seed gives the same schedule, the same trace and
the same findings, so a failing seed replays exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from twinvol.replication.core.lease import LeaseConfig
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.testing.far import FarState, SimTarget
from twinvol.testing.history import Client, Findings, Op, check
from twinvol.testing.node import Disk, SimNode, SimOptions
from twinvol.testing.sim import HOST, Clock, Network, Scheduler
from twinvol.testing.witness import SimWitness

NODES = ("A", "B")
BLOCKS = 8
CLIENTS = 3
TAKEOVER_AFTER = 2.0

FAULTS = ("kill", "pause", "cut_peer", "cut_witness", "isolate", "pause_witness",
          "kill_witness", "cut_host")
FAR_FAULTS = ("kill_far", "pause_far", "cut_far", "dr_standby")
ONE_WAY_FAULTS = ("one_way_to_peer", "one_way_to_witness", "one_way_from_witness")


@dataclass(slots=True)
class Result:
    seed: int
    faults: list[str]
    ops: int
    findings: Findings
    trace: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.findings.total() == 0

    def line(self) -> str:
        c = self.findings.counts()
        verdict = "ok" if self.ok else "FAIL"
        counts = " ".join(f"{k}={v}" for k, v in c.items())
        return f"seed {self.seed}: {verdict} faults={len(self.faults)} ops={self.ops} {counts}"


class Cluster:
    def __init__(self, seed: int, options: SimOptions, lease: LeaseConfig) -> None:
        self.rng = random.Random(seed)
        self.options = options
        self.sched = Scheduler()
        self.net = Network(self.sched, self.rng)
        self.trace: list[str] = []
        self.findings = Findings()
        drift = lease.drift

        def clock() -> Clock:
            return Clock(self.rng.uniform(0, 1000), 1 + self.rng.uniform(-drift, drift))

        self.nodes: dict[str, SimNode] = {}
        self.far = SimTarget(clock(), self.sched, self.net, BLOCKS, self._far_check,
                             options.far_inconsistent) if options.far else None
        # Every state a copy of the pair had: a consistent far copy must be one of them.
        self.states: set[tuple[int, ...]] = {tuple([0] * BLOCKS)}
        for name, partner, role in (("A", "B", Role.PRIMARY), ("B", "A", Role.SECONDARY)):
            disk = Disk([0] * BLOCKS, role, Mode.MIRROR,
                        far=FarState(feeder=name == "A") if options.far else None)
            node = SimNode(name, partner, clock(), self.sched, self.net, disk, lease, options,
                           self._alone, self._trace)
            node.state_hook = self._state
            self.nodes[name] = node
            self.net.add(node)
        if self.far is not None:
            self.net.add(self.far)
        self.witness = SimWitness("W", NODES, clock(), self.sched, self.net, TAKEOVER_AFTER)
        self.net.add(self.witness)
        self.values = [0]
        self.log: list[Op] = []
        self.clients = [Client(f"c{i}", i, CLIENTS, BLOCKS, NODES, self.sched, self.net,
                               self.rng, self.values, self.log) for i in range(CLIENTS)]
        for c in self.clients:
            self.net.add(c)

    def _trace(self, line: str) -> None:
        self.trace.append(f"{self.sched.now:9.4f} {line}")

    def _alone(self, node: SimNode) -> None:
        """A write is acknowledged by `node` alone: its partner must not be serving."""
        other = self.nodes[node.partner]
        if other.alive and not other.paused and other.serving(other.local_now()):
            self.findings.alone.append(f"{self.sched.now:.4f}: {node.name} acknowledged a "
                                       f"write alone while {other.name} served ({other.mode})")

    def _state(self, node: SimNode) -> None:
        self.states.add(tuple(node.disk.copy))

    def _far_check(self, target: SimTarget) -> None:
        """C says it is consistent: its copy must be a state the pair really had."""
        if tuple(target.disk.copy) not in self.states:
            self.findings.far.append(f"{self.sched.now:.4f}: C at {target.disk.applied} holds "
                                     f"{target.disk.copy}, a state no copy of the pair had")

    # ---- the nemesis ---------------------------------------------------------------------

    def schedule_faults(self, start: float, end: float) -> list[str]:
        t = start
        done: list[str] = []
        while True:
            t += self.rng.uniform(0.3, 3.0)
            if t >= end:
                return done
            kind = self.rng.choice(FAULTS + (FAR_FAULTS if self.far is not None else ())
                                   + (ONE_WAY_FAULTS if self.options.one_way else ()))
            node = self.rng.choice(NODES)
            length = self.rng.uniform(0.5, 6.0)
            done.append(f"{t:.2f} {kind} {node} {length:.2f}s")
            self.sched.at(t, self.fault, kind, node, length)
            if self.rng.random() < 0.7:
                t += length  # mostly one fault at a time; sometimes they overlap

    def fault(self, kind: str, name: str, length: float) -> None:
        self._trace(f"nemesis: {kind} {name} for {length:.2f}s")
        node = self.nodes[name]
        heal: Callable[[], None]
        if kind in FAR_FAULTS:
            heal = self._far_fault(kind, node)
        elif kind == "kill":
            if not node.alive:
                return
            node.kill()
            heal = partial(self._restart, node)
        elif kind == "pause":
            node.pause()
            heal = node.resume
        elif kind == "pause_witness":
            self.witness.pause()
            heal = self.witness.resume
        elif kind == "kill_witness":
            if not self.witness.alive:
                return
            self.witness.kill()
            heal = self._restart_witness
        elif kind in ONE_WAY_FAULTS:
            src, dst = {"one_way_to_peer": (name, node.partner),
                        "one_way_to_witness": (name, "W"),
                        "one_way_from_witness": ("W", name)}[kind]
            self.net.cut_one_way(src, dst)
            heal = partial(self.net.heal_one_way, src, dst)
        else:
            links = {"cut_peer": [("A", "B")], "cut_witness": [(name, "W")],
                     "isolate": [(name, node.partner), (name, "W")],
                     "cut_host": [(name, HOST)]}[kind]
            for a, b in links:
                self.net.cut(a, b)

            def heal() -> None:
                for a, b in links:
                    self.net.heal(a, b)
        self.sched.at(self.sched.now + length, heal)

    def _far_fault(self, kind: str, node: SimNode) -> Callable[[], None]:
        far = self.far
        assert far is not None
        if kind == "kill_far":
            far.kill()
            return far.boot
        if kind == "pause_far":
            far.pause()
            return far.resume
        if kind == "cut_far":
            self.net.cut(node.name, far.name)
            return partial(self.net.heal, node.name, far.name)
        # dr_standby: the feeder's site is lost (kill -9); once the standby serves alone,
        # the operator runs `dr takeover` there. The lost site returns after the fault.
        feeder = next((n for n in self.nodes.values()
                       if n.disk.far is not None and n.disk.far.feeder), None)
        if feeder is None or not feeder.alive:
            return lambda: None
        feeder.kill()
        standby = self.nodes[feeder.partner]
        self.sched.at(self.sched.now + self.rng.uniform(2.5, 4.0), self._dr_takeover,
                      feeder, standby)
        return partial(self._restart, feeder)

    def _dr_takeover(self, feeder: SimNode, standby: SimNode) -> None:
        """Refused, as `dr takeover` is, while the feeder runs or the standby is blocked."""
        if feeder.alive or not standby.alive or standby.paused or standby.far is None \
                or standby.mode is Mode.BLOCK:
            self._trace(f"nemesis: dr takeover at {standby.name} refused")
            return
        self._trace(f"nemesis: dr takeover at {standby.name}")
        standby.far.takeover()

    def _restart(self, node: SimNode) -> None:
        if not node.alive:
            self._trace(f"{node.name} restarts")
            node.boot()

    def _restart_witness(self) -> None:
        if not self.witness.alive:
            self.witness.boot()

    def heal_everything(self) -> None:
        self.net.heal_all()
        for node in self.nodes.values():
            if not node.alive:
                self._restart(node)
            if node.paused:
                node.resume()
        if not self.witness.alive:
            self.witness.boot()
        if self.witness.paused:
            self.witness.resume()
        if self.far is not None:
            if not self.far.alive:
                self.far.boot()
            if self.far.paused:
                self.far.resume()

    def converged(self) -> bool:
        a, b = self.nodes["A"], self.nodes["B"]
        return all(n.disk.state is PairState.MIRRORED and n.mode is Mode.MIRROR
                   and n.session is not None and not n.copying for n in (a, b)) \
            and a.disk.copy == b.disk.copy and self.far_converged()

    def far_converged(self) -> bool:
        if self.far is None:
            return True
        d = self.far.disk
        return d.consistent and d.copy == self.nodes["A"].disk.copy and any(
            n.far is not None and n.far.s.feeder and n.far.s.mode == "journal"
            and d.applied == n.far.s.written and d.feeder == n.name
            for n in self.nodes.values())


    def finish(self, seed: int, faults: list[str], settle: float = 30.0) -> Result:
        """Stop the clients, heal everything, wait for the pair to converge, and judge."""
        for client in self.clients:
            client.running = False
        self.heal_everything()
        self._trace("nemesis: everything healed")
        deadline = self.sched.now + settle
        while self.sched.now < deadline and not self.converged():
            self.sched.run_until(self.sched.now + 0.5)
        self.sched.run_until(self.sched.now + 11.0)  # let requests in flight end
        if not self.converged():
            states = {n: (x.disk.state.value, x.mode.value, x.session is not None)
                      for n, x in self.nodes.items()}
            if self.far is not None and not self.far_converged():
                far = {n: (x.far.s.feeder, x.far.s.mode, x.far.s.written, sorted(x.far.s.dirty))
                       for n, x in self.nodes.items() if x.far is not None}
                d = self.far.disk
                self.findings.far.append(f"far copy not caught up {settle:g}s after healing: "
                                         f"C applied {d.applied}, consistent {d.consistent}, "
                                         f"fed by {d.feeder}, {d.copy} vs A "
                                         f"{self.nodes['A'].disk.copy}; sides {far}")
            else:
                self.findings.other.append(f"no convergence {settle:g}s after healing: "
                                           f"{states}")
        if any(n.split_brain for n in self.nodes.values()):
            self.findings.other.append("split brain")
        check(self.log, {n: list(x.disk.copy) for n, x in self.nodes.items()}, self.findings)
        return Result(seed, faults, len(self.log), self.findings, self.trace)


def run(seed: int, duration: float = 20.0, options: SimOptions | None = None,
        lease: LeaseConfig | None = None, settle: float = 30.0) -> Result:
    """Faults and I/O for `duration` simulated seconds, then heal and wait to converge."""
    c = Cluster(seed, options or SimOptions(), lease or LeaseConfig())
    faults = c.schedule_faults(1.0, duration - 1.0)
    c.sched.run_until(duration)
    return c.finish(seed, faults, settle)
