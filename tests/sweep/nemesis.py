"""The nemesis: a fault schedule drawn from the seed, and the thread that carries it out.

`schedule` is a pure function of (seed, duration, kinds), so a failing seed reruns the
same faults in the same order with the same lengths. Faults come one at a time: before
each one the nemesis waits (a bounded time) for the pair to be mirrored again, so every
fault hits a healthy pair; the planned instants are therefore "not before" times.
"""

from __future__ import annotations

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


def schedule(seed: int, duration: float, kinds: tuple[str, ...] = DEFAULT_KINDS
             ) -> list[Fault]:
    """The faults of one seed: random kinds, targets and lengths, with gaps of 1-3 s."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = START + rng.uniform(0, 1.0)
    while True:
        kind = rng.choice(kinds)
        targets, lo, hi = KINDS[kind]
        fault = Fault(round(t, 3), kind, rng.choice(targets), round(rng.uniform(lo, hi), 3))
        if fault.at + fault.length > duration - SETTLE:
            return faults
        faults.append(fault)
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
    return []


class Nemesis:
    """Runs `faults` against the cluster from `t0` (time.monotonic) on, in a thread;
    `log` records what was done and when."""

    def __init__(self, cluster: Cluster, net: Links, faults: list[Fault], t0: float,
                 end: float, settle_timeout: float = 20.0) -> None:
        self.cluster = cluster
        self.net = net
        self.faults = faults
        self.t0 = t0
        self.end = end  # no fault may still be active after this
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
        try:
            for fault in self.faults:
                if not self._sleep_until(self.t0 + fault.at):
                    break
                waited = time.monotonic()
                while not self.cluster.mirrored() and time.monotonic() - waited < \
                        self.settle_timeout and not self._stop_event.is_set():
                    time.sleep(0.2)
                start = time.monotonic()
                if start + fault.length > self.end or self._stop_event.is_set():
                    self.log.append({**asdict(fault), "skipped": "no time left"})
                    continue
                self._apply(fault)
                healed = self._heal_at(fault, start + fault.length)
                self.log.append({**asdict(fault), "start": start, "end": healed,
                                 "settle_wait": round(start - waited, 3)})
        except BaseException as e:  # reported by the runner
            self.error = e
        finally:
            self.done.set()
        self._stop_event.wait()  # see stop()

    def _apply(self, fault: Fault) -> None:
        if fault.kind in ("kill", "witness-kill"):
            self.cluster.kill9(fault.target)
        elif fault.kind == "pause":
            self.cluster.pause(fault.target)
        for link in links_of(fault):
            self.net.cut(link)

    def _heal_at(self, fault: Fault, t: float) -> float:
        """Heal at `t` even when asked to stop: nothing stays broken."""
        self._stop_event.wait(max(0.0, t - time.monotonic()))
        healed = time.monotonic()
        if fault.kind in ("kill", "witness-kill"):
            self.cluster.start_one(fault.target, wait=False)
        elif fault.kind == "pause":
            self.cluster.resume(fault.target)
        for link in links_of(fault):
            self.net.heal(link)
        return healed
