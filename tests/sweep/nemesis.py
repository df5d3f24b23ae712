"""The nemesis: a fault schedule drawn from the seed, and the thread that carries it out.

`schedule` is a pure function of (seed, duration, kinds), so a failing seed reruns the
same faults in the same order with the same lengths. By default faults come one at a
time: before each one the nemesis waits (a bounded time) for the pair to be mirrored
again, so every fault hits a healthy pair, and the planned instants are "not before"
times. With `overlap` faults on different processes and links overlap in time and
nobody waits for the pair.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# kind -> (targets, shortest, longest length in seconds)
KINDS: dict[str, tuple[tuple[str, ...], float, float]] = {
    "kill": (("A", "B"), 0.5, 4.0),          # kill -9, restart after `length`
    "pause": (("A", "B", "W"), 1.0, 6.0),    # SIGSTOP, SIGCONT after `length`
    "peer-cut": (("AB",), 1.0, 6.0),         # the A<->B link
    "witness-cut": (("A", "B"), 1.0, 6.0),   # the node<->W link
    "isolate": (("A", "B"), 1.0, 6.0),       # node<->partner and node<->W; host reaches it
    "witness-kill": (("W",), 0.5, 4.0),      # kill -9 of the witness, restart
    "host-cut": (("A", "B"), 1.0, 6.0),      # the host<->node link (agent and clients)
}
DEFAULT_KINDS = tuple(KINDS)
START = 1.0       # first fault no earlier than this into the workload
SETTLE = 4.0      # workload seconds kept fault-free at the end (resync under load)


@dataclass(frozen=True)
class Fault:
    at: float       # planned start, seconds into the workload
    kind: str
    target: str
    length: float

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}/{self.length:.1f}s"


def resources(fault: Fault) -> set[str]:
    """The processes and links a fault takes: overlapping faults never share one."""
    if fault.kind in ("kill", "pause", "witness-kill"):
        return {fault.target}
    if fault.kind == "split":
        return {"pair"}
    return set(links_of(fault))


def schedule(seed: int, duration: float, kinds: tuple[str, ...] = DEFAULT_KINDS,
             overlap: bool = False,
             table: dict[str, tuple[tuple[str, ...], float, float]] | None = None
             ) -> list[Fault]:
    """The faults of one seed: random kinds, targets and lengths. One at a time with
    gaps of 1-3 s, or with `overlap` each starting 0.5 s to (its length + 2 s) after
    the previous one began, on processes and links no active fault holds."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = START + rng.uniform(0, 1.0)
    while True:
        kind = rng.choice(kinds)
        targets, lo, hi = (table or KINDS)[kind]
        fault = Fault(round(t, 3), kind, rng.choice(targets), round(rng.uniform(lo, hi), 3))
        busy = [f for f in faults if f.at + f.length > fault.at and
                resources(f) & resources(fault)]
        if busy:  # only with overlap: start once what it needs is free again
            fault = Fault(round(max(f.at + f.length for f in busy) + 0.5, 3), kind,
                          fault.target, fault.length)
        if fault.at + fault.length > duration - SETTLE:
            return faults
        faults.append(fault)
        if overlap:
            t = fault.at + rng.uniform(0.5, fault.length + 2.0)
        else:
            t = fault.at + fault.length + rng.uniform(1.0, 3.0)


class Cluster(Protocol):
    """What the nemesis needs of the harness."""

    def kill9(self, name: str) -> None: ...
    def start_one(self, name: str, wait: bool = True) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def mirrored(self) -> bool: ...


class Links(Protocol):
    def cut(self, link: str) -> None: ...
    def heal(self, link: str) -> None: ...


def links_of(fault: Fault) -> list[str]:
    if fault.kind == "peer-cut":
        return ["AB"]
    if fault.kind == "witness-cut":
        return [f"{fault.target}W"]
    if fault.kind == "isolate":
        return ["AB", f"{fault.target}W"]
    if fault.kind == "host-cut":
        return [f"h{fault.target}"]
    if fault.kind == "link-cut":
        return [fault.target]
    return []


class Nemesis:
    """Runs `faults` against the cluster from `t0` (time.monotonic) on, in a thread;
    `log` records what was done and when."""

    def __init__(self, cluster: Cluster, net: Links, faults: list[Fault], t0: float,
                 end: float, overlap: bool = False, settle_timeout: float = 20.0) -> None:
        self.cluster = cluster
        self.net = net
        self.faults = faults
        self.t0 = t0
        self.end = end  # no fault may still be active after this
        self.overlap = overlap
        self.settle_timeout = settle_timeout
        self.log: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="nemesis", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until every fault was applied and healed."""
        return self.done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Heal what is active, and end the thread (only after the processes it started
        are stopped: a child gets its parent-death signal when the *thread* that started
        it exits)."""
        self._stop_event.set()
        self.thread.join(timeout)

    def _sleep_until(self, t: float) -> bool:
        return not self._stop_event.wait(max(0.0, t - time.monotonic()))

    def run(self) -> None:
        """One thread applies and heals everything in time order. Without overlap each
        fault first waits (up to settle_timeout) for a mirrored pair, and the rest of
        the schedule moves by that wait."""
        events: list[tuple[float, int, int]] = [(f.at, 1, i) for i, f in enumerate(self.faults)]
        heapq.heapify(events)  # (planned time, 0 heal / 1 apply, fault index)
        started: dict[int, float] = {}
        shift = 0.0
        try:
            while events:
                at, apply, i = heapq.heappop(events)
                fault = self.faults[i]
                if apply:
                    if not self._sleep_until(self.t0 + at + shift):
                        break
                    waited = time.monotonic()
                    while not self.overlap and not self.cluster.mirrored() and \
                            time.monotonic() - waited < self.settle_timeout and \
                            not self._stop_event.is_set():
                        time.sleep(0.2)
                    start = time.monotonic()
                    shift += start - waited
                    if start + fault.length > self.end or self._stop_event.is_set():
                        self.log.append({**asdict(fault), "skipped": "no time left"})
                        continue
                    self._apply(fault)
                    started[i] = start
                    self.log.append({**asdict(fault), "start": start,
                                     "settle_wait": round(start - waited, 3)})
                    heapq.heappush(events, (at + fault.length, 0, i))
                else:
                    self._stop_event.wait(max(0.0, started[i] + fault.length
                                              - time.monotonic()))
                    self._heal(fault)
                    start = started.pop(i)
                    entry = next(x for x in self.log if x.get("start") == start)
                    entry["end"] = time.monotonic()
        except BaseException as e:  # reported by the runner
            self.error = e
        finally:
            for i, start in list(started.items()):  # stopped early: nothing stays broken
                self._heal(self.faults[i])
                for x in self.log:
                    if x.get("start") == start:
                        x["end"] = time.monotonic()
            self.done.set()
        self._stop_event.wait()  # see stop()

    def _apply(self, fault: Fault) -> None:
        if fault.kind in ("kill", "witness-kill"):
            self.cluster.kill9(fault.target)
        elif fault.kind == "pause":
            self.cluster.pause(fault.target)
        for link in links_of(fault):
            self.net.cut(link)

    def _heal(self, fault: Fault) -> None:
        if fault.kind in ("kill", "witness-kill"):
            self.cluster.start_one(fault.target, wait=False)
        elif fault.kind == "pause":
            self.cluster.resume(fault.target)
        for link in links_of(fault):
            self.net.heal(link)
