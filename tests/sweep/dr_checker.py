"""The three-site sweep's disaster-recovery checker: pure functions from the write
history, the copies read after each DR command and the commands' JSON reports to
findings (see `remote_dr` for the phase that produces them).

Times: clients log `time.monotonic()`; a report's `recovery_point.time` is the primary's
`time.time()` when it gave that write its sequence number. Every process shares one
machine clock, so the runner converts it with the offset between the two clocks (it
measures the offset around the commands; `margin` covers its drift).

The primary gives a write its sequence number, with that time, before the write is
acknowledged, and after it was sent. So for the recovery point R (sequence S, time T):
a write acknowledged before T has a number below S and is in a copy that holds exactly
the first S writes; a write sent after T has a number above S and is not.

* corrupt / mix: C's data at the takeover is the primary's state after some prefix of
  the write order (remote_checker.check_sample, as a copy that claims `mirrored`).
* kept: a write acknowledged before the reported recovery point is missing at C (its
  block holds something certainly older): the takeover lost a write it claims to keep.
* ahead: C holds a write sent after the reported recovery point: the report lies about
  where C is (or C applied records past what it reports).
* lag: a write acknowledged and then covered by an acknowledged flush (a flush its
  thread sent after the write's answer) more than `lag_bound` seconds before the
  disaster is missing at C: the far copy was further behind than any fault explains.
* report: a DR command's report contradicts what the sites show (sequence numbers, state,
  I/O mode, the chunks a failback copies).
* understated: the takeover reports fewer lost writes (`lost.sequences`) than were
  acknowledged and sent after its recovery point (each of those has a number above it,
  so each is lost), or fewer lost seconds than those writes span.
* served: C does not serve hosts after the takeover: a request through C failed, no
  write through C was acknowledged, or a read through C returned neither the data C
  had at the takeover nor a write through C (or something older than a write through C
  acknowledged before the read was sent).
* lost: a write acknowledged in a window (through C after its takeover, or any write
  after a takeover at the standby) is missing on a copy that must hold it.
* diverged: sites that must be equal (after a catch-up or a failback) differ.
* feed: a takeover at the standby or a failback to the original primary moved more than
  what changed: a full copy, more journal records than writes were sent, or more chunks
  than the writes since the far copy was last caught up touched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checker import INF, Finding, Op, Value
from .remote_checker import History, Sample, _describe, check_sample, older

KINDS = ("corrupt", "mix", "kept", "ahead", "lag", "report", "understated", "served",
         "lost", "diverged", "feed")
CHUNK_BLOCKS = 16   # 64 KiB chunks of 4 KiB blocks
AL_EXTENT_BLOCKS = 1024  # 4 MiB activity-log extents


@dataclass
class DrReport:
    variant: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    commands: list[dict[str, Any]] = field(default_factory=list)  # each DR command's report
    events: list[dict[str, Any]] = field(default_factory=list)    # what the phase did, when
    offset: float = 0.0     # time.time() - time.monotonic() when the phase began
    findings: dict[str, list[Finding]] = field(
        default_factory=lambda: {k: [] for k in KINDS})
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.notes and not any(self.findings.values())

    def add(self, fs: Iterable[Finding]) -> None:
        for f in fs:
            self.findings[f.kind].append(f)

    def summary(self) -> str:
        bad = " ".join(f"{k}={len(v)}" for k, v in self.findings.items() if v)
        cmds = ",".join(f"{c['command']}:{c.get('rc')}" for c in self.commands)
        return f"{self.variant} [{cmds}] {bad or 'ok'}"


def _held(h: History, values: Sequence[Value], at: float) -> dict[int, Op | None]:
    """Block -> the write it holds (None: zeros); blocks with foreign content left out."""
    out: dict[int, Op | None] = {}
    for b, v in enumerate(values):
        w, bad = h.source(b, v, at)
        if not bad:
            out[b] = w
    return out


def check_takeover(ops: Iterable[Op], values: Sequence[Value], rp_sequence: int,
                   rp_time: float, disaster: float, lag_bound: float, margin: float,
                   at: float) -> list[Finding]:
    """C's data (`values`, read at `at`) right after `dr takeover --site C` reported the
    recovery point (`rp_sequence`, `rp_time` on the clients' clock); A and B were lost
    at `disaster`."""
    ops = list(ops)
    h = History(ops)
    out = check_sample(h, Sample(at, values, "mirrored", applied=rp_sequence))
    held = _held(h, values, at)
    rp = f"recovery point {rp_sequence} at {rp_time:.3f}"
    for b, x in held.items():
        forced = h.newest_acked_before(b, rp_time - margin)
        if forced is not None and forced is not x and older(x, forced):
            out.append(Finding(
                "kept", b, f"C took over at {rp} but block {b} holds {_describe(x)}, while "
                f"{_describe(forced)} was acknowledged before the recovery point", at))
        if x is not None and x.send > rp_time + margin:
            out.append(Finding(
                "ahead", b, f"C took over at {rp} but block {b} holds {_describe(x)}, sent "
                f"{x.send - rp_time:.3f}s after the recovery point", at))
    for b, w in flushed_before(ops, disaster - lag_bound).items():
        x = held.get(b, w)
        if w is not x and older(x, w):
            out.append(Finding(
                "lag", b, f"C took over at {rp}, {disaster - rp_time:.1f}s before the "
                f"disaster at {disaster:.3f}; block {b} holds {_describe(x)}, but "
                f"{_describe(w)} was flushed more than {lag_bound:g}s before the disaster",
                at))
    return out


def flushed_before(ops: Iterable[Op], cut: float) -> dict[int, Op]:
    """Per block, the latest-sent acknowledged write that an acknowledged flush of the
    same client thread covered (the flush sent after the write's answer) before `cut`."""
    by_thread: dict[tuple[str, int], list[Op]] = defaultdict(list)
    for o in ops:
        by_thread[(o.client, o.thread)].append(o)
    out: dict[int, Op] = {}
    for seq in by_thread.values():
        seq.sort(key=lambda o: o.send)
        flushes = [f for f in seq if f.op == "f" and f.acked and f.done_at < cut]
        if not flushes:
            continue
        until = max(f.send for f in flushes)
        for w in seq:
            if w.op == "w" and w.acked and w.done_at < until:
                best = out.get(w.block)
                if best is None or w.send > best.send:
                    out[w.block] = w
    return out


def check_takeover_report(report: Mapping[str, Any], view: Mapping[str, Any] | None,
                          asked: float, margin: float, offset: float) -> list[Finding]:
    """A `serve` report of `dr takeover --site C` against C's own view right after it;
    `asked` is when the command was sent (clients' clock), `offset` converts the report's
    times (primary-site `time.time()`) to it."""
    out: list[Finding] = []

    def bad(msg: str) -> None:
        out.append(Finding("report", -1, f"takeover at C: {msg} (report {dict(report)})"))

    if report.get("action") != "serve":
        bad(f"action {report.get('action')!r}, expected 'serve'")
        return out
    rp, lost = report.get("recovery_point") or {}, report.get("lost") or {}
    seq, t = int(rp.get("sequence", -1)), float(rp.get("time", 0.0))
    if seq < 0:
        bad("no recovery point sequence")
    if seq > 0 and t - offset > asked + margin:
        bad(f"recovery point time {t - offset:.3f} is after the command was sent "
            f"({asked:.3f})")
    if int(lost.get("sequences", -1)) < 0 or int(lost.get("last_written", -1)) < seq:
        bad("lost writes below zero or last written below the recovery point")
    if view is None:
        bad("C does not show the remote copy after the takeover")
        return out
    applied = int(view["sequence"]["applied"])
    if applied != seq:
        bad(f"C's applied sequence is {applied}, the report's recovery point {seq}")
    if (view.get("state"), view.get("io_mode")) != ("takeover", "local"):
        bad(f"C is {view.get('state')}/{view.get('io_mode')}, expected takeover/local")
    return out


def check_lost_report(ops: Iterable[Op], report: Mapping[str, Any], rp_time: float,
                      margin: float, offset: float = 0.0) -> list[Finding]:
    """`lost` of a takeover at C against the acknowledged writes sent after its recovery
    point (`rp_time` on the clients' clock). C knows only what the feeder reported, so
    the count is a lower bound: writes acknowledged after `known_until` (the feeder's
    last word, `offset` converts it to the clients' clock) are not held against it."""
    lost = report.get("lost") or {}
    if not lost.get("lower_bound"):
        return [Finding("report", -1, "the takeover at C does not say its `lost` is a "
                                      "lower bound", rp_time)]
    known = lost.get("known_until")
    until = float(known) - offset - margin if known is not None else rp_time
    after = [o for o in ops if o.op == "w" and o.acked and rp_time + margin < o.done_at < until]
    if not after:
        return []
    n, secs = int(lost.get("sequences", 0)), float(lost.get("seconds", 0.0))
    span = max(o.send for o in after) - rp_time - margin
    if n >= len(after) and secs >= span:
        return []
    return [Finding("understated", -1,
                    f"the takeover at C reports {n} lost write(s) over {secs:g}s, but "
                    f"{len(after)} acknowledged write(s) were sent after its recovery point "
                    f"(sequence {(report.get('recovery_point') or {}).get('sequence')}), "
                    f"the last {span:.3f}s after it", rp_time)]


def check_served(ops: Iterable[Op], base: Sequence[Value], client: str = "C"
                 ) -> list[Finding]:
    """Requests through `client` (C after its takeover); `base` is what C held when it
    took over, as read right after."""
    mine = [o for o in ops if o.client == client]
    out = [Finding("served", o.block, f"{o.op} via {client} {o.status}: {o.detail or '-'} "
                                      f"(sent {o.send:.3f})", o.send)
           for o in mine if o.status != "ok"]
    writes = [o for o in mine if o.op == "w" and o.acked]
    if not writes:
        out.append(Finding("served", -1, f"no write through {client} was acknowledged "
                                         f"({len(mine)} requests)"))
    h = History(writes)
    for r in mine:
        if r.op != "r" or not r.acked or r.answer is None:
            continue
        w = h.by_wid.get(r.value) if isinstance(r.value, int) and r.value else None
        newest = h.newest_acked_before(r.block, r.send)
        if w is None and r.value != base[r.block]:
            why = "neither the data C held at its takeover nor a write through it"
        elif w is not None and (w.block != r.block or w.send > r.answer):
            why = "a write that cannot be there"
        elif newest is not None and newest is not w and older(w, newest):
            why = f"older than {_describe(newest)}"
        else:
            continue
        out.append(Finding("served", r.block, f"read via {client} sent {r.send:.3f} "
                                              f"returned {r.value!r}: {why}", r.send))
    return out


def check_present(ops: Iterable[Op], values: Sequence[Value] | None, copy: str,
                  sent_after: float = -INF, what: str = "") -> list[Finding]:
    """Every write acknowledged and sent after `sent_after` is on `copy` (`values`): its
    block holds it or something not certainly older."""
    if values is None:
        return [Finding("lost", -1, f"{copy} could not be read")]
    h = History(ops)
    held = _held(h, values, INF)
    out: list[Finding] = []
    for w in h.by_wid.values():
        if not w.acked or w.send <= sent_after or w.block >= len(values):
            continue
        x = held.get(w.block, w)
        if x is not w and older(x, w):
            out.append(Finding("lost", w.block, f"{_describe(w)}{what} is missing on {copy}: "
                                                f"block {w.block} holds {_describe(x)}", w.send))
    return out


def check_equal(disks: Mapping[str, bytes | None], why: str, block: int = 4096
                ) -> list[Finding]:
    """Every copy in `disks` equal byte for byte (None: it could not be read)."""
    out: list[Finding] = []
    names = sorted(disks)
    for n in names:
        if disks[n] is None:
            out.append(Finding("diverged", -1, f"{why}: {n} could not be read"))
    readable = [n for n in names if disks[n] is not None]
    for n in readable[1:]:
        a, b = disks[readable[0]], disks[n]
        assert a is not None and b is not None
        if a != b:
            differ = [i for i in range(max(len(a), len(b)) // block)
                      if a[i * block:(i + 1) * block] != b[i * block:(i + 1) * block]]
            out.append(Finding("diverged", differ[0] if differ else -1,
                               f"{why}: {n} differs from {readable[0]} in {len(differ)} "
                               f"block(s) (first {differ[:8]})"))
    return out


def chunks_of(ops: Iterable[Op]) -> set[int]:
    return {o.block // CHUNK_BLOCKS for o in ops if o.op == "w"}


def extent_chunks(ops: Iterable[Op], blocks: int) -> set[int]:
    """Every chunk of the activity-log extents the writes touched (a crash resync
    copies whole extents), within a volume of `blocks` blocks."""
    last = (blocks - 1) // CHUNK_BLOCKS
    per = AL_EXTENT_BLOCKS // CHUNK_BLOCKS
    return {c for e in {o.block // AL_EXTENT_BLOCKS for o in ops if o.op == "w"}
            for c in range(e * per, (e + 1) * per) if c <= last}


def check_feed(report: Mapping[str, Any], action: str, writes: int, chunks: int
               ) -> list[Finding]:
    """A `dr takeover --site B` (action `feed`) or `dr failback --site A` (action
    `return`) report: no full copy, at most `writes` journal records (the writes sent
    since the far copy was last caught up) or `chunks` chunks (those they touched)."""
    out: list[Finding] = []

    def bad(msg: str) -> None:
        out.append(Finding("feed", -1, f"{action}: {msg} (report {dict(report)})"))

    if report.get("action") != action:
        bad(f"action {report.get('action')!r}, expected {action!r}")
        return out
    method = report.get("method")
    # A copy of every chunk is needless only when the writes did not touch them all (a
    # small volume under a busy writer can have every chunk changed: the bound below).
    if report.get("full_copy") and (method != "bitmap"
                                    or int(report.get("chunks", 0)) > chunks):
        bad("a full copy, though the standby held everything the far copy lacked")
    if method == "journal" and int(report.get("records", 0)) > writes:
        bad(f"{report.get('records')} records for {writes} writes sent since the far copy "
            "was caught up")
    elif method == "bitmap" and int(report.get("chunks", 0)) > chunks:
        bad(f"{report.get('chunks')} chunks, while the writes since the far copy was "
            f"caught up touched {chunks}")
    elif method not in ("journal", "bitmap"):
        bad(f"unknown method {method!r}")
    return out


def check_failback_report(report: Mapping[str, Any], rp_sequence: int,
                          changed_there: tuple[int, int], at_most: int) -> list[Finding]:
    """The report of `dr failback` after a takeover at C: from C, at C's recovery point;
    C changed between `changed_there` chunks (its acknowledged writes) and the upper
    bound (all its writes); at most `at_most` chunks copied (C's writes and every write
    not acknowledged before the recovery point)."""
    out: list[Finding] = []

    def bad(msg: str) -> None:
        out.append(Finding("report", -1, f"failback: {msg} (report {dict(report)})"))

    if report.get("from") != "C":
        bad(f"from {report.get('from')!r}, expected 'C'")
    if report.get("recovery_point") != rp_sequence:
        bad(f"recovery point {report.get('recovery_point')}, the takeover reported "
            f"{rp_sequence}")
    there = sum(int(p.get("changed_there", 0)) for p in (report.get("pairs") or {}).values())
    lo, hi = changed_there
    if not lo <= there <= hi:
        bad(f"C changed {there} chunk(s) since its takeover; its writes touched {lo} "
            f"(acknowledged) to {hi}")
    if int(report.get("chunks", 0)) > at_most:
        bad(f"{report.get('chunks')} chunks copied back; at most {at_most} can differ")
    return out
