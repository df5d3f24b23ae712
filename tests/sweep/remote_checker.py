"""The three-site sweep's checker: pure functions from the write history, samples of the
far copy C, and polls of every side's status to findings.

The order that matters is the order the primary applied writes in (their journal
sequence numbers); the clients only see real time. A write W1 certainly precedes W2 in
that order when W1 was acknowledged before W2 was sent (W1 was applied, and got its
sequence number, before it was answered). A write that failed or was never answered may
have been applied at any time after it was sent, or never.

* mix: a sample of C taken while C's status claimed `mirrored` (a consistent point, what
  a DR takeover would serve) must be the primary's state after some prefix of the write
  order. Each block names the write that produced it (or zeros). Every write C holds was
  applied, so every write acknowledged before the latest-sent of them was sent is in the
  prefix too; a block that holds something certainly older than such a write (or zeros
  while one exists) cannot be explained by any prefix. Writes in flight can fall either
  way, so the check never fires on an ordering the clients could not observe.
* regress: a block of C holds something certainly older than in an earlier sample (the
  far copy went back in time), whatever the status said.
* untracked: C's content changed between two samples while C claimed `mirrored` at both,
  in every poll between them, and received no journal record in between (its `received`
  before the first equals its `received` after the second). In journal mode the far copy
  changes only by applying records; data that arrives otherwise (a catch-up by dirty
  chunks) makes it inconsistent, and then it must not claim to be a consistent point
  (a DR takeover serves a copy that claims `mirrored`). A copying episode shorter than
  the poll interval between the samples would be missed by the polls; twinvol has none.
* corrupt: content no write of that block produced, or a write sent after the sample.
* stall: for `stall` seconds with no fault active, every side reported `mirrored` while
  writes were pending (the feeder's `written` above C's `applied`) and C's `applied` did
  not move: a copy that cannot advance must say so.
* lag / diverged (see `check_final`): after healing the lag must reach 0 within a bound,
  and C must then equal the primary byte for byte.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checker import INF, Finding, Op, Value

KINDS = ("mix", "untracked", "regress", "corrupt", "stall", "lag", "diverged")


@dataclass(frozen=True)
class Sample:
    """C's volume read from disk while C was stopped."""

    at: float                  # when C was stopped (monotonic)
    values: Sequence[Value]    # each block's decoded content
    claimed: str               # C's status around the freeze: "mirrored" or what else
    applied: int | None = None  # C's applied sequence number before the freeze
    received: tuple[int, int] | None = None  # C's received before and after the freeze


@dataclass(frozen=True)
class Poll:
    """Every side's remote-copy view at one instant (None: no answer)."""

    at: float
    views: Mapping[str, Mapping[str, Any] | None]


@dataclass
class RemoteReport:
    samples: int = 0
    checked: int = 0          # samples taken while C claimed mirrored
    polls: int = 0
    catch_up: float | None = None  # seconds from healing to lag 0
    findings: dict[str, list[Finding]] = field(
        default_factory=lambda: {k: [] for k in KINDS})
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.notes and not any(self.findings.values())

    def add(self, f: Finding) -> None:
        self.findings[f.kind].append(f)

    def summary(self) -> str:
        counts = " ".join(f"{k}={len(v)}" for k, v in self.findings.items())
        up = "-" if self.catch_up is None else f"{self.catch_up:.1f}s"
        return (f"samples={self.checked}/{self.samples} polls={self.polls} "
                f"catch_up={up} {counts}")


def _describe(w: Op | None) -> str:
    if w is None:
        return "zeros"
    ans = "unanswered" if w.answer is None else f"answered {w.answer:.3f} ({w.status})"
    return f"write {w.value:#x} sent {w.send:.3f} {ans}"


class History:
    """The writes of a run, by id and by block (acknowledged ones by answer time)."""

    def __init__(self, ops: Iterable[Op]) -> None:
        self.by_wid: dict[int, Op] = {}
        blocks: dict[int, list[Op]] = defaultdict(list)
        for o in ops:
            if o.op == "w" and isinstance(o.value, int):
                self.by_wid[o.value] = o
                if o.acked:
                    blocks[o.block].append(o)
        # per block: answer times ascending, and the latest-sent write among each prefix
        self.answers: dict[int, list[float]] = {}
        self.newest: dict[int, list[Op]] = {}
        for b, ws in blocks.items():
            ws.sort(key=lambda w: w.done_at)
            self.answers[b] = [w.done_at for w in ws]
            best: list[Op] = []
            for w in ws:
                best.append(w if not best or w.send > best[-1].send else best[-1])
            self.newest[b] = best

    def newest_acked_before(self, block: int, t: float) -> Op | None:
        """Of the writes to `block` acknowledged before `t`, the one sent last."""
        answers = self.answers.get(block)
        if not answers:
            return None
        i = bisect.bisect_left(answers, t)
        return self.newest[block][i - 1] if i else None

    def source(self, block: int, value: Value, at: float) -> tuple[Op | None, str | None]:
        """The write that produced `value` in `block` (None: zeros), or why none did."""
        if isinstance(value, str):
            return None, f"content no write produced ({value[1:]})"
        if value is None or value == 0:
            return None, None
        w = self.by_wid.get(value)
        if w is None:
            return None, f"unknown write id {value:#x}"
        if w.block != block:
            return None, f"holds write {value:#x} of block {w.block}"
        if w.send > at:
            return None, f"holds write {value:#x} sent at {w.send:.3f}, after the sample"
        return w, None


def older(a: Op | None, b: Op) -> bool:
    """Is content `a` (None: zeros) certainly older than write `b` in the apply order?"""
    return a is None or (a.acked and a.done_at < b.send)


def check_sample(h: History, s: Sample) -> list[Finding]:
    """`corrupt` and `mix` findings of one sample."""
    out: list[Finding] = []
    held: dict[int, Op | None] = {}
    for b, v in enumerate(s.values):
        w, bad = h.source(b, v, s.at)
        if bad:
            out.append(Finding("corrupt", b, f"C at {s.at:.3f}: {bad}", s.at))
        else:
            held[b] = w
    if s.claimed != "mirrored":
        return out
    top = max((w for w in held.values() if w is not None), key=lambda w: w.send, default=None)
    if top is None:
        return out
    for b, x in held.items():
        forced = h.newest_acked_before(b, top.send)
        if forced is not None and forced is not x and older(x, forced):
            out.append(Finding(
                "mix", b,
                f"C at {s.at:.3f} (claiming mirrored, applied {s.applied}) holds "
                f"{_describe(x)} in block {b}, but block {top.block} holds {_describe(top)}, "
                f"and {_describe(forced)} to block {b} was acknowledged before that was "
                "sent: no prefix of the write order explains both", s.at))
    return out


def check_regress(h: History, prev: Sample, cur: Sample) -> list[Finding]:
    out: list[Finding] = []
    for b, (p, c) in enumerate(zip(prev.values, cur.values, strict=False)):
        wp, bad_p = h.source(b, p, prev.at)
        wc, bad_c = h.source(b, c, cur.at)
        if bad_p or bad_c or wp is None or wc is wp:
            continue
        if older(wc, wp):
            out.append(Finding(
                "regress", b,
                f"C went back in time: block {b} held {_describe(wp)} at {prev.at:.3f}, "
                f"then {_describe(wc)} at {cur.at:.3f}", cur.at))
    return out


def check_untracked(prev: Sample, cur: Sample, polls: Sequence[Poll],
                    target: str = "C") -> list[Finding]:
    """See the module docstring; `polls` may hold any polls, those between count."""
    if prev.claimed != "mirrored" or cur.claimed != "mirrored" or prev.received is None \
            or cur.received is None or prev.received[0] != cur.received[1]:
        return []
    between = [p.views.get(target) for p in polls if prev.at <= p.at <= cur.at]
    if not all(v is not None and v.get("group_state") == "mirrored" for v in between):
        return []
    changed = [b for b, (x, y) in enumerate(zip(prev.values, cur.values, strict=False))
               if x != y]
    if not changed:
        return []
    b = changed[0]
    return [Finding(
        "untracked", b,
        f"C's content changed in {len(changed)} block(s) (first {changed[:8]}; block {b}: "
        f"{prev.values[b]!r} -> {cur.values[b]!r}) between {prev.at:.3f} and {cur.at:.3f} "
        f"with no journal record received (received {cur.received[1]}, applied "
        f"{cur.applied}), while C claimed mirrored throughout ({len(between)} polls): "
        "the far copy took data outside the journal and still claims a consistent point",
        cur.at)]


def _busy(at: float, faults: Sequence[Mapping[str, Any]]) -> bool:
    return any(f["start"] <= at <= f.get("end", INF) for f in faults if "start" in f)


def find_stalls(polls: Sequence[Poll], faults: Sequence[Mapping[str, Any]],
                stall: float, target: str = "C") -> list[Finding]:
    """Silent stalls: see the module docstring. `faults` are the nemesis log entries
    (with `start` and `end`)."""
    out: list[Finding] = []
    since: float | None = None
    applied: int | None = None
    reported = False
    for p in polls:
        views = list(p.views.values())
        tv = p.views.get(target)
        feeder = None if tv is None else p.views.get(str(tv.get("feeder")))
        quiet = (not _busy(p.at, faults) and tv is not None and feeder is not None
                 and all(v is not None and v.get("group_state") == "mirrored" for v in views))
        if not quiet or tv is None or feeder is None:
            since, reported = None, False
            continue
        now_applied = int(tv["sequence"]["applied"])
        pending = int(feeder["sequence"]["written"]) > now_applied
        if not pending or since is None or now_applied != applied:
            since, applied, reported = (p.at if pending else None), now_applied, False
            continue
        if p.at - since >= stall and not reported:
            reported = True
            states = ", ".join(
                f"{n}: {v['group_state']}/{v.get('journal_mode')} written "
                f"{v['sequence']['written']} applied {v['sequence']['applied']}"
                if v is not None else f"{n}: -" for n, v in p.views.items())
            out.append(Finding(
                "stall", -1,
                f"C applied nothing past {applied} for {p.at - since:.1f}s (since "
                f"{since:.3f}) with no fault active, writes pending and every side "
                f"reporting mirrored: {states}", since))
    return out


def check_final(c: bytes | None, primary: bytes | None, primary_name: str,
                catch_up: float | None, bound: float, block: int = 4096) -> list[Finding]:
    """After healing: the lag reached 0 within `bound` seconds (`catch_up` None: never),
    and C equals the primary byte for byte."""
    out: list[Finding] = []
    if catch_up is None or catch_up > bound:
        out.append(Finding("lag", -1, "the lag did not return to 0 within "
                                      f"{bound:g}s after healing"))
    if c is not None and primary is not None and c != primary:
        differ = [b for b in range(max(len(c), len(primary)) // block)
                  if c[b * block:(b + 1) * block] != primary[b * block:(b + 1) * block]]
        out.append(Finding("diverged", differ[0] if differ else -1,
                           f"C differs from {primary_name} in {len(differ)} block(s) "
                           f"(first {differ[:8]}), sizes {len(c)} and {len(primary)}"))
    return out


def check_remote(history: Iterable[Op], samples: Sequence[Sample], polls: Sequence[Poll],
                 faults: Sequence[Mapping[str, Any]], stall: float) -> RemoteReport:
    """Findings of the samples and polls of one run (`check_final` adds the rest)."""
    rep = RemoteReport(samples=len(samples), polls=len(polls))
    h = History(history)
    prev: Sample | None = None
    for s in samples:
        rep.checked += s.claimed == "mirrored"
        for f in check_sample(h, s):
            rep.add(f)
        if prev is not None:
            for f in check_regress(h, prev, s) + check_untracked(prev, s, polls):
                rep.add(f)
        prev = s
    for f in find_stalls(polls, faults, stall):
        rep.add(f)
    return rep
