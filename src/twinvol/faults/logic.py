"""Sans-IO fault logic: dedup and order, rate limiting, relay choice, detectors' memory.

Nothing here reads a clock, a socket or a file: time is passed in as `now`, so the
same code runs in the node and under hypothesis with made-up times.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from twinvol.faults.model import FaultDraft, FaultReport, severity_rank

# ---- dedup and order ------------------------------------------------------------


class Watermarks:
    """Per origin stream, the highest seq taken. A report at or below it is a duplicate
    (at-least-once delivery resends); a report above it is new, and taking it keeps each
    origin's order because every source delivers a stream in seq order."""

    def __init__(self, marks: dict[str, int] | None = None) -> None:
        self.marks: dict[str, int] = dict(marks or {})
        self.gaps = 0  # seqs skipped (pruned at the source before they reached us)

    def get(self, stream: str) -> int:
        return self.marks.get(stream, 0)

    def accept(self, report: FaultReport) -> bool:
        last = self.marks.get(report.stream, 0)
        if report.seq <= last:
            return False
        self.gaps += report.seq - last - 1
        self.marks[report.stream] = report.seq
        return True


class Outbox:
    """A node's own reports, kept (up to `retention`) so any relay can be brought up to
    date from its own watermark: switching relays resends what the new one lacks."""

    def __init__(self, retention: int = 10000) -> None:
        self.retention = retention
        self.reports: collections.deque[FaultReport] = collections.deque()
        self.pruned = 0

    @property
    def last_seq(self) -> int:
        return self.reports[-1].seq if self.reports else 0

    def append(self, report: FaultReport) -> None:
        if self.reports and report.seq <= self.reports[-1].seq:
            raise ValueError("outbox reports must be appended in seq order")
        self.reports.append(report)
        while len(self.reports) > self.retention:
            self.reports.popleft()
            self.pruned += 1

    def after(self, seq: int, limit: int) -> list[FaultReport]:
        """Reports with a seq above `seq`, oldest first, at most `limit`."""
        if not self.reports or self.reports[-1].seq <= seq:
            return []
        first = self.reports[0].seq
        start = max(0, seq - first + 1)  # seqs are contiguous within the outbox
        out = []
        for i in range(start, min(len(self.reports), start + limit)):
            out.append(self.reports[i])
        return out

    def pending(self, watermark: int) -> int:
        return max(0, self.last_seq - watermark)


# ---- rate limiting ----------------------------------------------------------------


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0
    first: FaultDraft | None = None
    last: FaultDraft | None = None
    worst: str = "info"


class RateLimiter:
    """Per kind of fault (component, kind, subject): `burst` reports pass in each `window`
    seconds; the rest are counted, and when the window ends one summary stands for them,
    carrying the last one's text and time and the first one's time. So a storm costs at
    most burst + 1 reports per window, and the first and last of each kind survive."""

    def __init__(self, burst: int = 20, window: float = 10.0, max_keys: int = 4096) -> None:
        self.burst = max(1, burst)
        self.window = window
        self.max_keys = max_keys
        self.windows: dict[tuple[str, str, str], _Window] = {}
        self.suppressed_total = 0

    def offer(self, draft: FaultDraft, now: float) -> list[FaultDraft]:
        """What to report now: the draft itself, or nothing (it was counted)."""
        out = self.tick(now)
        key = draft.key()
        w = self.windows.get(key)
        if w is None:
            if len(self.windows) >= self.max_keys:
                self._evict(now)
            w = self.windows[key] = _Window(now)
        if w.passed < self.burst:
            w.passed += 1
            out.append(draft)
            return out
        w.suppressed += draft.count
        self.suppressed_total += draft.count
        if w.first is None:
            w.first = draft
        w.last = draft
        if severity_rank(draft.severity) > severity_rank(w.worst):
            w.worst = draft.severity
        return out

    def tick(self, now: float) -> list[FaultDraft]:
        """Summaries of windows that have ended."""
        out: list[FaultDraft] = []
        for key, w in list(self.windows.items()):
            if now < w.start + self.window:
                continue
            if w.suppressed:
                out.append(self._summary(w))
                self.windows[key] = _Window(now)
            else:
                del self.windows[key]
        return out

    def next_deadline(self) -> float | None:
        ends = [w.start + self.window for w in self.windows.values() if w.suppressed]
        return min(ends) if ends else None

    def _summary(self, w: _Window) -> FaultDraft:
        assert w.last is not None and w.first is not None
        last = w.last
        n = w.suppressed
        return msgspec.structs.replace(
            last, count=n, first_time=w.first.first_time or w.first.time,
            severity=w.worst if severity_rank(w.worst) > severity_rank(last.severity)
            else last.severity,
            description=f"{last.description} [summary: {n} such reports suppressed in "
                        f"{self.window:g} s; this is the last of them]")

    def _evict(self, now: float) -> None:
        idle = [k for k, w in self.windows.items() if not w.suppressed]
        for k in idle[: max(1, len(idle) // 2)]:
            del self.windows[k]
        if len(self.windows) >= self.max_keys:  # all storming: the oldest window goes
            oldest = min(self.windows, key=lambda k: self.windows[k].start)
            del self.windows[oldest]


# ---- relay choice -------------------------------------------------------------------


@dataclass
class RelayView:
    """What the origin last learned about one relay candidate."""

    reachable: bool = False
    subscribers: int = 0
    watermark: int = 0  # the relay has our stream up to here
    failures: int = 0


def choose_route(me: str, candidates: Sequence[str], views: dict[str, RelayView],
                 local_subscribers: int, current: str | None) -> str | None:
    """Where this node's reports go: a node hosts are listening to. Stay on the current
    route while it serves hosts (no flapping between relays); otherwise the first
    candidate, in the host's path order, that is reachable and has hosts listening (this
    node itself first if it is a candidate). With no host listening anywhere, keep them
    on this node if hosts would read it, else on the first reachable candidate, so they
    wait where a host will look. None: hold them in the outbox."""

    def up(n: str) -> bool:
        return n == me or (n in views and views[n].reachable)

    def hosts(n: str) -> bool:
        return local_subscribers > 0 if n == me else n in views and views[n].subscribers > 0

    if current is not None and current in candidates and up(current) and hosts(current):
        return current
    for n in ([me] if me in candidates else []) + [c for c in candidates if c != me]:
        if up(n) and hosts(n):
            return n
    if me in candidates:
        return me
    for n in candidates:
        if up(n):
            return n
    return None


# ---- detectors' memory -------------------------------------------------------------


@dataclass
class Flapping:
    """A link that went down `count` times within `window` seconds is flapping."""

    count: int = 3
    window: float = 30.0
    downs: dict[str, collections.deque[float]] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)

    def down(self, peer: str, now: float) -> bool:
        """Record a loss; True when it makes the link flapping (once per window)."""
        q = self.downs.setdefault(peer, collections.deque())
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) >= self.count and now - self.reported.get(peer, -1e18) >= self.window:
            self.reported[peer] = now
            return True
        return False


@dataclass
class Threshold:
    """A level with hysteresis: `ok`, `warning` above `warn`, `critical` above `crit`;
    it falls back only when the value is `margin` below the threshold it crossed."""

    warn: float
    crit: float
    margin: float = 0.02
    level: str = "ok"

    def update(self, value: float) -> str | None:
        """The new level when it changed, else None."""
        if value >= self.crit or (self.level == "critical" and value >= self.crit - self.margin):
            new = "critical"
        elif value >= self.warn or (self.level != "ok" and value >= self.warn - self.margin):
            new = "warning"
        else:
            new = "ok"
        if new == self.level:
            return None
        self.level = new
        return new


__all__ = ["Flapping", "Outbox", "RateLimiter", "RelayView", "Threshold", "Watermarks",
           "choose_route"]
