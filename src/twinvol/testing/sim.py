"""Deterministic machinery for the simulator: a scheduler, drifting clocks, processes
that can be paused and killed, and a network of ordered links that can be cut, both ways or one way.

Everything random comes from one `random.Random(seed)`, and events at the same time run
in the order they were scheduled, so a seed replays exactly.

Links behave like TCP connections that retransmit forever: a message on a cut link is
held and delivered, in order, once the link heals (the receiver's session check drops
it if its connection was declared dead meanwhile). A paused process (SIGSTOP) receives
nothing until it resumes, then handles its backlog in order at the resume time; a
killed process loses every message in flight to it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "H"  # every client sits on the host side of the host links


class Scheduler:
    """A discrete-event loop over simulated real time (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn, args))

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            when, _, fn, args = heapq.heappop(self._queue)
            self.now = when
            fn(*args)
        self.now = end


@dataclass(slots=True)
class Clock:
    """A monotonic clock that runs at `rate` times real time (drift) from `offset`."""

    offset: float
    rate: float

    def read(self, real: float) -> float:
        return self.offset + self.rate * real

    def real_at(self, local: float) -> float:
        # A hair late, so that reading the clock at that moment never gives a value
        # below `local` by rounding (a timer would fire early, forever, at one instant).
        return (local - self.offset) / self.rate + 1e-9


@dataclass(eq=False)
class Proc:
    """A simulated process: its own clock; messages and timers pass through `run`."""

    name: str
    clock: Clock
    sched: Scheduler
    alive: bool = True
    incarnation: int = 0
    paused: bool = False
    backlog: list[tuple[Callable[..., None], tuple[Any, ...]]] = field(default_factory=list)

    def local_now(self) -> float:
        return self.clock.read(self.sched.now)

    def run(self, inc: int, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` now in this process, unless it died since (`inc`) or is paused."""
        if not self.alive or inc != self.incarnation:
            return
        if self.paused:
            self.backlog.append((fn, args))
            return
        fn(*args)

    def timer(self, local_when: float, fn: Callable[..., None], *args: Any) -> None:
        self.sched.at(self.clock.real_at(local_when), self.run, self.incarnation, fn, *args)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        backlog, self.backlog = self.backlog, []
        for fn, args in backlog:
            if self.paused or not self.alive:
                self.backlog.append((fn, args))
            else:
                fn(*args)

    def kill(self) -> None:
        self.alive = False
        self.paused = False
        self.backlog.clear()
        self.incarnation += 1

    def receive(self, src: str, msg: object) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def link_of(a: str, b: str) -> frozenset[str]:
    """The link a message between `a` and `b` crosses (clients share the host side)."""
    a = HOST if a.startswith("c") else a
    b = HOST if b.startswith("c") else b
    return frozenset((a, b))


class Network:
    """Ordered point-to-point links with random delay, cuttable per pair of sites."""

    def __init__(self, sched: Scheduler, rng: random.Random) -> None:
        self.sched = sched
        self.rng = rng
        self.procs: dict[str, Proc] = {}
        self.down: set[frozenset[str]] = set()
        self.down_one: set[tuple[str, str]] = set()   # one direction only: (from, to)
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[frozenset[str], list[tuple[Proc, int, str, object]]] = {}
        self._held_one: dict[tuple[str, str], list[tuple[Proc, int, str, object]]] = {}
        self.sent = 0

    def add(self, proc: Proc) -> None:
        self.procs[proc.name] = proc

    def delay(self) -> float:
        if self.rng.random() < 0.02:
            return self.rng.uniform(0.005, 0.08)  # a slow moment
        return self.rng.uniform(0.0002, 0.002)

    def send(self, src: str, dst: str, msg: object) -> None:
        proc = self.procs.get(dst)
        if proc is None or not proc.alive:
            return
        self.sent += 1
        key = (src, dst)
        when = max(self._last.get(key, 0.0), self.sched.now + self.delay())
        self._last[key] = when
        self.sched.at(when, self._arrive, proc, proc.incarnation, src, msg)

    def _arrive(self, proc: Proc, inc: int, src: str, msg: object) -> None:
        link = link_of(src, proc.name)
        if link in self.down:
            self._held.setdefault(link, []).append((proc, inc, src, msg))
            return
        if (src, proc.name) in self.down_one:
            self._held_one.setdefault((src, proc.name), []).append((proc, inc, src, msg))
            return
        proc.run(inc, proc.receive, src, msg)

    def cut(self, a: str, b: str) -> None:
        self.down.add(link_of(a, b))

    def heal(self, a: str, b: str) -> None:
        link = link_of(a, b)
        self.down.discard(link)
        for proc, inc, src, msg in self._held.pop(link, []):
            proc.run(inc, proc.receive, src, msg)  # in order, before anything sent later

    def cut_one_way(self, src: str, dst: str) -> None:
        """Messages from `src` to `dst` stop (held, as TCP retransmits), the others flow:
        the sender keeps hearing its peer while the receiver hears nothing."""
        self.down_one.add((src, dst))

    def heal_one_way(self, src: str, dst: str) -> None:
        self.down_one.discard((src, dst))
        for proc, inc, s, msg in self._held_one.pop((src, dst), []):
            proc.run(inc, proc.receive, s, msg)

    def heal_all(self) -> None:
        for link in list(self.down):
            a, b = sorted(link)
            self.heal(a, b)
        for src, dst in list(self.down_one):
            self.heal_one_way(src, dst)
