"""The sweep's checker: a pure function from request histories and final copies to findings.

Time is real time as the clients saw it (send and answer instants on one monotonic
clock). Without knowing the order the storage applied concurrent writes in, a write W1
is *older* than W2 only when W1 was answered before W2 was sent; the initial zeros are
older than every write. The rules:

* stale: a read returns data older than a write acknowledged before the read was sent
  (the guarantee's wording, checked through the agent and every node alike);
* lost: an acknowledged write whose block, in the final state of every readable copy,
  holds data older than it (a later or concurrent write may legitimately replace it);
* corrupt: content no write of that block produced (torn, misplaced, unknown write id,
  or a write sent only after the read was answered);
* divergent: a block the two copies hold differently once healed, and chunks that
  `pair verify` found mismatched;
* errors: any failed, refused or unanswered request through the host agent. Direct
  requests to a node that fail are only counted as `unavailable`: a fenced node must
  refuse them.

A write that failed or never got an answer may or may not have taken effect, at any
time after it was sent: it can explain a read or a final value but is never required.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

AGENT = "agent"
INF = float("inf")

Value = int | str | None  # a write id, 0 for zeros, "?why" for foreign content


@dataclass(frozen=True, slots=True)
class Op:
    """One logged request (see client.py for the line format)."""

    client: str           # "agent" or the node name for direct connections
    thread: int
    op: str               # "w", "r" or "c" (failed connection attempt)
    block: int
    value: Value          # write id written, or value read
    send: float
    answer: float | None  # None: no answer came
    status: str           # "ok", "err", "timeout"
    detail: str = ""

    @classmethod
    def from_line(cls, rec: Sequence[Any]) -> Op:
        return cls(str(rec[0]), int(rec[1]), str(rec[2]), int(rec[3]), rec[4],
                   float(rec[5]), None if rec[6] is None else float(rec[6]), str(rec[7]),
                   str(rec[8]))

    @property
    def acked(self) -> bool:
        return self.status == "ok" and self.answer is not None

    @property
    def done_at(self) -> float:
        """When the request is known to have taken effect, if it did (inf: unknown)."""
        return self.answer if self.acked and self.answer is not None else INF


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    block: int
    message: str
    at: float = 0.0   # when it was observed (monotonic), for matching with faults

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "block": self.block, "message": self.message,
                "at": self.at}


@dataclass
class Report:
    ops: int = 0
    writes: int = 0
    acked_writes: int = 0
    reads: int = 0
    unavailable: int = 0
    agent_write_gap: float = 0.0   # longest time without an acknowledged agent write
    agent_gap_at: float = 0.0      # when that gap began
    agent_slowest: float = 0.0     # longest answered agent request
    findings: dict[str, list[Finding]] = field(default_factory=lambda: {
        k: [] for k in ("lost", "stale", "corrupt", "divergent", "errors")})
    notes: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return len(self.findings[kind])

    @property
    def ok(self) -> bool:
        return not self.notes and not any(self.findings.values())

    def summary(self) -> str:
        counts = " ".join(f"{k}={len(v)}" for k, v in self.findings.items())
        return (f"ops={self.ops} writes={self.acked_writes}/{self.writes} reads={self.reads} "
                f"{counts} unavailable={self.unavailable} "
                f"agent_gap={self.agent_write_gap:.2f}s agent_slowest={self.agent_slowest:.2f}s")


def _describe(w: Op | None, wid: Value) -> str:
    if w is None:
        return "zeros" if wid == 0 else f"{wid!r}"
    ans = "unanswered" if w.answer is None else f"answered {w.answer:.3f} ({w.status})"
    return f"write {w.value:#x} via {w.client} sent {w.send:.3f} {ans}"


def _held(by_wid: Mapping[int, Op], value: Value) -> str:
    return _describe(by_wid.get(value) if isinstance(value, int) else None, value)


class _Block:
    """Acknowledged writes of one block, by answer time, with the latest send among
    every prefix: the newest write known to be older than a given instant."""

    def __init__(self, writes: list[Op]) -> None:
        acked = sorted((w for w in writes if w.acked), key=lambda w: w.done_at)
        self.answers = [w.done_at for w in acked]
        self.newest: list[Op] = []
        for w in acked:
            if not self.newest or w.send > self.newest[-1].send:
                self.newest.append(w)
            else:
                self.newest.append(self.newest[-1])

    def newest_acked_before(self, t: float) -> Op | None:
        """Of the writes answered before `t`, the one sent last."""
        i = bisect.bisect_left(self.answers, t)
        return self.newest[i - 1] if i else None


def check(history: Iterable[Op], final: Mapping[str, Sequence[Value] | None],
          verify_mismatches: int | None = 0) -> Report:
    """Findings of one run. `final[node]` holds each block's value on that copy after
    healing (None: the copy could not be read); `verify_mismatches` is what `pair
    verify` found afterwards (None: it did not run)."""
    rep = Report()
    ops = list(history)
    rep.ops = len(ops)
    by_wid: dict[int, Op] = {}
    writes: dict[int, list[Op]] = defaultdict(list)
    for o in ops:
        if o.op == "w":
            rep.writes += 1
            rep.acked_writes += o.acked
            assert isinstance(o.value, int)
            by_wid[o.value] = o
            writes[o.block].append(o)
        elif o.op == "r":
            rep.reads += 1
        if o.status != "ok":
            if o.client == AGENT:
                rep.findings["errors"].append(Finding(
                    "errors", o.block, f"{o.op} via agent {o.status}: {o.detail or '-'} "
                    f"(sent {o.send:.3f})", o.send))
            else:
                rep.unavailable += 1
    index = {b: _Block(ws) for b, ws in writes.items()}
    agent = [o for o in ops if o.client == AGENT and o.acked and o.answer is not None]
    rep.agent_slowest = max((o.done_at - o.send for o in agent), default=0.0)
    acks = sorted(o.done_at for o in agent if o.op == "w")
    rep.agent_write_gap, rep.agent_gap_at = max(((b - a, a) for a, b in pairwise(acks)),
                                                default=(0.0, 0.0))

    def source(block: int, value: Value, at: float) -> tuple[Op | None, str | None]:
        """The write that produced `value`, or why no write did."""
        if isinstance(value, str):
            return None, f"content no write produced ({value[1:]})"
        if value is None or value == 0:
            return None, None
        w = by_wid.get(value)
        if w is None:
            return None, f"unknown write id {value:#x}"
        if w.block != block:
            return None, f"holds write {value:#x} of block {w.block}"
        if w.send > at:
            return None, f"holds write {value:#x} sent at {w.send:.3f}, after {at:.3f}"
        return w, None

    for o in ops:
        if o.op != "r" or not o.acked or o.answer is None:
            continue
        w, bad = source(o.block, o.value, o.answer)
        if bad:
            rep.findings["corrupt"].append(Finding(
                "corrupt", o.block, f"read via {o.client} sent {o.send:.3f}: {bad}", o.send))
            continue
        blk = index.get(o.block)
        newer = blk.newest_acked_before(o.send) if blk else None
        older_until = -INF if w is None else w.done_at
        if newer is not None and newer.send > older_until:
            rep.findings["stale"].append(Finding(
                "stale", o.block,
                f"read via {o.client} sent {o.send:.3f} answered {o.answer:.3f} returned "
                f"{_describe(w, o.value)}; {_describe(newer, newer.value)}, "
                f"{(o.send - newer.done_at) * 1000:.0f} ms before the read", o.send))

    readable = {n: v for n, v in final.items() if v is not None}
    for n, v in final.items():
        if v is None:
            rep.notes.append(f"final state of {n} could not be read")
    for n, values in readable.items():
        for b, value in enumerate(values):
            _, bad = source(b, value, INF)
            if bad:
                rep.findings["corrupt"].append(Finding(
                    "corrupt", b, f"final copy on {n}: {bad}"))
    if readable:
        for b, ws in writes.items():
            kept: dict[str, float] = {}  # node -> when its final value is known done
            for n, values in readable.items():
                fw, bad = source(b, values[b] if b < len(values) else None, INF)
                kept[n] = -INF if bad or fw is None else fw.done_at
            for w in ws:
                if w.acked and all(k < w.send for k in kept.values()):
                    holds = ", ".join(f"{n} holds {_held(by_wid, v[b])}"
                                      for n, v in readable.items())
                    rep.findings["lost"].append(Finding(
                        "lost", b, f"{_describe(w, w.value)} is gone: {holds}", w.send))
    if len(readable) == 2:
        (na, va), (nb, vb) = sorted(readable.items())
        for b, (x, y) in enumerate(zip(va, vb, strict=False)):
            if x != y:
                rep.findings["divergent"].append(Finding(
                    "divergent", b, f"{na} holds {x!r}, {nb} holds {y!r}"))
    if verify_mismatches is None:
        rep.notes.append("pair verify did not run")
    elif verify_mismatches:
        rep.findings["divergent"].append(Finding(
            "divergent", -1, f"pair verify found {verify_mismatches} mismatched chunk(s)"))
    return rep
