"""One seeded run of the real node code (`realnodes`) under the deterministic runtime:
an active-active pair A-B with the witness W, hosts writing and reading through both
nodes with the real NBD client, a nemesis of kill -9, SIGSTOP and link cuts, then
healing and the verdict of the same history checker the model simulator uses.

    python -m twinvol.testing --real --seeds 20

The same seed gives the same interleaving, the same trace and the same findings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from twinvol.nbd.aio_client import NbdClient
from twinvol.node.node import Node
from twinvol.replication.core.lease import LeaseConfig
from twinvol.replication.core.types import GroupState, PairState
from twinvol.replication.leases import Leases
from twinvol.replication.runtime import PairRuntime
from twinvol.testing.history import TIMEOUT, Findings, Op, check
from twinvol.testing.realfar import GROUP, FarWatch, far_state
from twinvol.testing.realnodes import (
    BLOCK_SPACING,
    HOSTS,
    NBD_PORT,
    SimWitnessService,
    block_bytes,
    block_value,
    cluster_file,
    crash,
    read_store,
    start_node,
)
from twinvol.testing.sim import Clock
from twinvol.testing.simdisk import Disks
from twinvol.testing.simloop import SimLoop, World

NODES = ("A", "B")
BLOCKS = 8
CLIENTS = 3
TAKEOVER_AFTER = 2.0
PAIR, VOLUME = "p", "v"
FAULTS = ("kill", "pause", "cut_peer", "cut_witness", "isolate", "pause_witness",
          "kill_witness", "cut_host", "one_way_to_peer", "one_way_to_witness",
          "one_way_from_witness", "power", "read_errors")
FAR_FAULTS = ("kill_far", "pause_far", "cut_far", "power_far", "damage_far")
SAMPLE_EVERY = 0.1   # how often C's copy is looked at while it says it is consistent


@dataclass(slots=True, frozen=True)
class Fault:
    at: float      # simulated seconds
    kind: str      # one of FAULTS or FAR_FAULTS
    node: str
    span: float    # how long until it heals (or the process comes back)


@dataclass(slots=True)
class RealResult:
    seed: int
    faults: list[str]
    ops: int
    findings: Findings
    trace: list[str] = field(default_factory=list)
    digest: str = ""   # of every request's outcome and time: equal when a seed replays
    far_samples: int = 0   # looks at C's copy while it said it was consistent

    @property
    def ok(self) -> bool:
        return self.findings.total() == 0

    def line(self) -> str:
        c = self.findings.counts()
        counts = " ".join(f"{k}={v}" for k, v in c.items())
        return (f"seed {self.seed}: {'ok' if self.ok else 'FAIL'} faults={len(self.faults)} "
                f"ops={self.ops} {counts}")


class Host:
    """Host clients spreading requests over A and B with the real NBD client, as the
    host agent does: a failed node is left alone for a moment."""

    def __init__(self, run: RealRun, loop: SimLoop) -> None:
        self.run = run
        self.loop = loop
        self.rng = random.Random(run.world.rng.random())
        self.conns: dict[str, NbdClient] = {}
        self.values = 0
        self.writing: set[int] = set()
        self.running = True

    async def conn(self, node: str) -> NbdClient:
        c = self.conns.get(node)
        if c is not None and c.alive:
            return c
        c = await NbdClient.connect(HOSTS[node], NBD_PORT, VOLUME, timeout=2.0)
        self.conns[node] = c
        return c

    def drop(self, node: str) -> None:
        c = self.conns.pop(node, None)
        if c is not None:
            c.abort()

    async def client(self, index: int) -> None:
        mine = [b for b in range(BLOCKS) if b % CLIENTS == index]
        while self.running:
            await asyncio.sleep(self.rng.uniform(0.005, 0.03))
            node = self.rng.choice(NODES)
            free = [b for b in mine if b not in self.writing]
            if free and self.rng.random() < 0.4:
                block = self.rng.choice(free)
                self.values += 1
                op = Op(f"c{index}", node, "w", block, self.run.world.now, self.values)
                self.writing.add(block)
            else:
                op = Op(f"c{index}", node, "r", self.rng.randrange(BLOCKS), self.run.world.now)
            self.run.log.append(op)
            try:
                async with asyncio.timeout(TIMEOUT):
                    c = await self.conn(node)
                    if op.kind == "w":
                        await c.pwrite(op.block * BLOCK_SPACING, block_bytes(op.block, op.value))
                    else:
                        op.value = block_value(op.block, bytes(
                            await c.pread(op.block * BLOCK_SPACING, 4096)))
                op.ok = True
                op.answered = self.run.world.now
            except Exception as e:  # any failure: the outcome is unknown, try elsewhere
                self.run.note(f"{op.client} {op.kind} {op.block} via {node} failed: {e!r}")
                self.drop(node)
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
            finally:
                if op.kind == "w":
                    self.writing.discard(op.block)


class RealRun:
    def __init__(self, seed: int, duration: float, lease: LeaseConfig, far: bool = True
                 ) -> None:
        self.seed = seed
        self.duration = duration
        self.world = World(seed)
        self.tmp = tempfile.mkdtemp(prefix=f"twinvol-sim-{seed}-",
                                    dir="/dev/shm" if shutil.disk_usage("/dev/shm") else None)
        self.cluster = cluster_file(self.tmp)
        drift = lease.drift
        self.clocks = {n: Clock(self.world.rng.uniform(0, 1000),
                                1 + self.world.rng.uniform(-drift, drift))
                       for n in ("A", "B", "C", "W")}
        self.nodes: dict[str, Node] = {}
        self.witness: SimWitnessService | None = None
        self.log: list[Op] = []
        self.trace: list[str] = []
        self.faults: list[str] = []
        self.findings = Findings()
        self.down: set[str] = set()      # killed, not restarted yet
        self.boots: dict[str, int] = {}  # power losses so far, by machine
        self.paused: set[str] = set()
        self.host_loop = self.world.loop("H", Clock(0.0, 1.0))
        self.far = FarWatch(self._far_values) if far else None
        self.disks = Disks(random.Random(self.world.rng.random()),
                           {n: self.cluster.data_dir(n) for n in ("A", "B", "C")})

    def note(self, what: str) -> None:
        self.trace.append(f"{self.world.now:9.4f} {what}")

    # -- processes --
    def start(self, name: str) -> None:
        loop = self.world.loop(name, self.clocks[name])
        loop.boot = f"{name}-{self.boots.get(name, 0)}"
        if name == "W":
            self.witness = SimWitnessService(self.cluster.path or "", loop, TAKEOVER_AFTER)
            loop.create_task(self.witness.start())
        else:
            task = loop.create_task(start_node(self.cluster, name))
            task.add_done_callback(lambda t: self._started(name, t))
        self.down.discard(name)
        self.note(f"start {name}")

    def _started(self, name: str, task: asyncio.Task[Node]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.findings.other.append(f"node {name} failed to start: {task.exception()!r}")
            return
        self.nodes[name] = task.result()
        if name == "C" and self.far is not None:
            self.far.sample(self.world.now)   # what a takeover right after a restart serves

    def kill(self, name: str) -> None:
        self.world.kill(name)
        if name == "W":
            if self.witness is not None:
                self.witness.close()
        else:
            node = self.nodes.pop(name, None)
            if node is not None:
                crash(node)
        self.down.add(name)
        self.paused.discard(name)
        self.note(f"kill {name}")

    def power(self, name: str) -> None:
        """The machine loses power: the process dies and unsynced writes may be lost."""
        self.kill(name)
        self.boots[name] = self.boots.get(name, 0) + 1
        before = self.disks.lost
        self.disks.power_loss(name)
        self.note(f"power loss {name}: {self.disks.lost - before} unsynced writes lost or torn")

    def damage(self, name: str) -> None:
        """The machine goes down and a byte of its newest journal segment flips (bit rot,
        a torn sector): it must find it when it starts, not apply or serve it."""
        self.kill(name)
        segments = sorted(glob.glob(os.path.join(self.cluster.data_dir(name), "**", "*.jnl"),
                                    recursive=True))
        size = os.path.getsize(segments[-1]) if segments else 0
        if not size:
            self.note(f"damage {name}: no journal to damage")
            return
        pos = self.disks.rng.randrange(size)
        with open(segments[-1], "r+b") as f:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ 0x10]))
        self.note(f"damage {name}: flipped byte {pos} of {os.path.basename(segments[-1])}")

    def read_errors(self, name: str, on: bool) -> None:
        (self.disks.failing.add if on else self.disks.failing.discard)(name)
        self.note(f"{name}'s volume reads {'fail' if on else 'work again'}")

    def pause(self, name: str, on: bool) -> None:
        loop = self.world.loops.get(name)
        if loop is not None:
            loop.paused = on
        (self.paused.add if on else self.paused.discard)(name)
        self.note(f"{'pause' if on else 'resume'} {name}")

    def cut(self, pairs: set[tuple[str, str]], what: str) -> None:
        self.world.set_cut(pairs)
        self.note(f"cut {what}" if pairs else "heal")

    def _far_values(self) -> list[int] | None:
        c = self.nodes.get("C")
        if c is None or "C" in self.paused:
            return None
        state = far_state(c)
        if state is None or state[0] != GroupState.MIRRORED:
            return None
        return read_store(c, VOLUME, BLOCKS)

    def _sample(self) -> None:
        assert self.far is not None
        self.far.sample(self.world.now)
        self.world.at(self.world.now + SAMPLE_EVERY, self._sample)

    # -- the schedule --
    def setup(self) -> None:
        for name in ("W", "A", "B", "C") if self.far else ("W", "A", "B"):
            self.start(name)
        self.world.run_until(1.0)
        a = self.nodes["A"]
        loop = self.world.loops["A"]
        a.volumes.create(VOLUME, BLOCKS * BLOCK_SPACING)
        self.world.run(a.replication.create(PAIR, VOLUME, "B", VOLUME), loop, limit=30)
        self.world.run(self._until_mirrored(), self.host_loop, limit=60)
        self.note("pair mirrored")
        if self.far is not None:
            self.world.run(a.replication.create(f"{PAIR}-dr", VOLUME, "C", VOLUME,
                                                mode="async", group=GROUP), loop, limit=30)
            self.world.run(self._until_far_mirrored(), self.host_loop, limit=60)
            self.note("far copy mirrored")
            self._sample()

    async def _until_far_mirrored(self) -> None:
        while "C" not in self.nodes or (far_state(self.nodes["C"]) or ("",))[0] != \
                GroupState.MIRRORED:
            await asyncio.sleep(0.1)

    async def _until_mirrored(self) -> None:
        while not all(n in self.nodes and PAIR in self.nodes[n].replication.pairs
                      and self.nodes[n].replication.pairs[PAIR].rec.state == PairState.MIRRORED
                      for n in NODES):
            await asyncio.sleep(0.1)

    def plan(self) -> list[Fault]:
        """The nemesis's random schedule: one fault at a time, with gaps. Drawn from its
        own generator, so a seed run with this plan given explicitly (`go(plan)`) is
        the same run: a failing seed's plan can be kept as a scenario."""
        rng = random.Random(f"plan-{self.seed}")
        t = self.world.now + 1.0
        end = self.world.now + self.duration
        out = []
        while t < end:
            fault = rng.choice(FAULTS + FAR_FAULTS if self.far else FAULTS)
            node = rng.choice(NODES)
            span = rng.uniform(0.5, 4.0)
            out.append(Fault(t, fault, "C" if fault in FAR_FAULTS else node, span))
            t += span + rng.uniform(0.5, 3.0)
        return out

    def schedule(self, plan: list[Fault]) -> None:
        at = self.world.at
        for f in plan:
            t, fault, node, span = f.at, f.kind, f.node, f.span
            other = "B" if node == "A" else "A"
            if fault in ("kill", "kill_far", "kill_witness", "power", "power_far", "damage_far"):
                name = "W" if fault == "kill_witness" else node
                down = {"power": self.power, "power_far": self.power,
                        "damage_far": self.damage}.get(fault, self.kill)
                at(t, down, name)
                at(t + span, self.start, name)
            elif fault == "read_errors":
                at(t, self.read_errors, node, True)
                at(t + span, self.read_errors, node, False)
            elif fault in ("pause", "pause_far", "pause_witness"):
                name = "W" if fault == "pause_witness" else node
                at(t, self.pause, name, True)
                at(t + span, self.pause, name, False)
            else:
                far = {"cut_peer": {other}, "cut_witness": {"W"}, "isolate": {other, "W"},
                       "cut_host": {"H"}, "cut_far": set(NODES)}.get(fault)
                pairs = ({(node, x) for x in far} | {(x, node) for x in far} if far else
                         {{"one_way_to_peer": (node, other), "one_way_to_witness": (node, "W"),
                           "one_way_from_witness": ("W", node)}[fault]})
                at(t, self.cut, pairs, f"{fault} {node}")
                at(t + span, self.cut, set(), "")
            self.faults.append(f"{t:.2f} {fault} {node} {span:.2f}s")
        self.heal_at = max((f.at + f.span for f in plan), default=self.world.now) + 0.5

    def heal(self) -> None:
        self.world.set_cut(set())
        for name in sorted(self.paused):
            self.pause(name, False)
        for name in sorted(self.down):
            self.start(name)

    def go(self, plan: list[Fault] | None = None) -> RealResult:
        """Run the schedule (`plan`, or the nemesis's random one), heal, judge."""
        self.setup()
        host = Host(self, self.host_loop)
        tasks = [self.host_loop.create_task(host.client(i)) for i in range(CLIENTS)]
        self.schedule(self.plan() if plan is None else plan)
        self.world.run_until(self.heal_at)
        self.heal()
        self.world.run_until(self.world.now + 2.0)
        host.running = False
        self.world.run_until(self.world.now + TIMEOUT + 1)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(TimeoutError):
            self.world.run(self._until_mirrored(), self.host_loop, limit=60)
        if self.far is not None:
            with contextlib.suppress(TimeoutError):
                self.world.run(self._until_far_caught_up(), self.host_loop, limit=60)
        self.settle()
        digest = hashlib.sha256(repr([(o.client, o.node, o.kind, o.block, o.sent, o.value,
                                       o.answered, o.ok) for o in self.log]).encode())
        return RealResult(self.seed, self.faults, len(self.log), self.findings, self.trace,
                          digest.hexdigest()[:16],
                          len(self.far.samples) if self.far is not None else 0)

    async def _until_far_caught_up(self) -> None:
        while True:
            c, a = self.nodes.get("C"), self.nodes.get("A")
            state = far_state(c) if c is not None else None
            if (a is not None and c is not None and state is not None
                    and state[0] == GroupState.MIRRORED and state[1] == state[2]
                    and read_store(c, VOLUME, BLOCKS) == read_store(a, VOLUME, BLOCKS)):
                return
            await asyncio.sleep(0.2)

    def settle(self) -> None:
        states = {n: self.nodes[n].replication.pairs[PAIR].rec.state
                  for n in NODES if n in self.nodes and PAIR in self.nodes[n].replication.pairs}
        if len(states) < 2 or any(s != PairState.MIRRORED for s in states.values()):
            self.findings.other.append(f"no convergence 60 s after healing: {states}")
        final = {n: read_store(self.nodes[n], VOLUME, BLOCKS) for n in NODES if n in self.nodes}
        if len(final) == 2:
            check(self.log, final, self.findings)
        if self.far is not None:
            self.far.check(self.log, self.findings)
            c = self.nodes.get("C")
            self.far.final(c, read_store(c, VOLUME, BLOCKS) if c is not None else None,
                           final.get("A"), self.findings)
        for e in self.world.errors:
            self.findings.other.append(f"unhandled error in a node: {e}")

    def close(self) -> None:
        self.world.close()
        self.nodes.clear()
        self.witness = None
        gc.collect()   # objects that close their own descriptors (SQLite, files) go here
        # What is left is raw descriptors the nodes opened (stores, bitmaps, journals):
        # a dead process's descriptors close with it.
        # (SQLite's own descriptors are left to its connections, which close them.)
        for fd in map(int, os.listdir("/proc/self/fd")):
            with contextlib.suppress(OSError):
                path = os.readlink(f"/proc/self/fd/{fd}")
                if path.startswith(self.tmp + os.sep) and ".sqlite" not in path \
                        and not path.endswith((".db", "-wal", "-shm")):
                    os.close(fd)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def seeded_entropy(seed: int) -> Iterator[None]:
    """Random ids (generations, nonces, volume ids) drawn from the seed, so they replay:
    `secrets` and `uuid` read `os.urandom` (through `random._urandom` for `secrets`)."""
    rng = random.Random(f"entropy-{seed}")
    saved = os.urandom, random._urandom  # type: ignore[attr-defined]

    def urandom(n: int) -> bytes:
        return rng.randbytes(n)

    os.urandom = random._urandom = urandom  # type: ignore[attr-defined]
    try:
        yield
    finally:
        os.urandom, random._urandom = saved  # type: ignore[attr-defined]


@contextlib.contextmanager
def without_leases() -> Iterator[None]:
    """The old behaviour, to show the simulator finds it: a mirrored copy serves hosts
    whether or not its partner's lease is valid (the consistency issue's stale reads)."""
    saved = Leases.gate

    def gate(self: Leases, pr: PairRuntime) -> None:
        if self.mgr.by_volume.get(pr.rec.volume) is not pr or pr.rec.volume in self.mgr.holds:
            return
        pr.vol.export.serve_until = 0.0 if pr.rec.io_mode == "block" else math.inf
        if pr.rec.io_mode != "block":
            self.mgr.node.unfence(pr.rec.volume)

    Leases.gate = gate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Leases.gate = saved  # type: ignore[method-assign]


def run_real(seed: int, duration: float = 20.0, *, leases: bool = True, far: bool = True,
             plan: list[Fault] | None = None) -> RealResult:
    """One seeded run of the real node code; the same seed gives the same result.
    `leases=False` puts the old rule back (see `without_leases`)."""
    logging.getLogger("twinvol").setLevel(logging.CRITICAL)
    with seeded_entropy(seed), (contextlib.nullcontext() if leases else without_leases()):
        run = RealRun(seed, duration, LeaseConfig(), far)
        try:
            with run.disks.installed():
                return run.go(plan)
        finally:
            run.close()
