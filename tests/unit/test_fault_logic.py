"""Sans-IO fault logic: dedup and order, outbox, rate limit, relay choice, detectors."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinvol.faults.detectors import from_event
from twinvol.faults.host import Inbox
from twinvol.faults.logic import (
    Flapping,
    Outbox,
    RateLimiter,
    RelayView,
    Threshold,
    Watermarks,
    choose_route,
)
from twinvol.faults.model import FaultDraft, FaultReport, Hop, RelayBatch, make_id
from twinvol.faults.sinks import syslog_line

INC = "0123abcd"


def rep(seq: int, origin: str = "C", kind: str = "io_error") -> FaultReport:
    return FaultReport(id=make_id(origin, INC, seq), origin=origin, site=origin,
                       incarnation=INC, seq=seq, component="disk", kind=kind,
                       severity="error", time=float(seq), description=f"#{seq}",
                       path=[Hop(origin, float(seq))])


def draft(kind: str = "storm", subject: str = "", t: float = 0.0, n: int = 0) -> FaultDraft:
    return FaultDraft(component="disk", kind=kind, severity="warning", subject=subject,
                      time=t, description=f"{kind} #{n}")


# ---- model ---------------------------------------------------------------------------


def test_report_round_trips_and_records_its_path() -> None:
    r = rep(3).via("A", 4.0)
    back = msgspec.json.decode(msgspec.json.encode(r), type=FaultReport)
    assert back == r and [h.node for h in back.path] == ["C", "A"]
    assert back.stream == f"C/{INC}"


@pytest.mark.parametrize("change, message", [
    ({"id": "C/0123abcd/4"}, "does not match"),
    ({"severity": "apocalyptic"}, "Invalid enum value"),
    ({"seq": 0}, ">= 1"),
    ({"path": []}, "length >= 1"),
    ({"path": [{"node": "A", "time": 1.0}]}, "start at the origin"),
    ({"origin": "C; rm -rf"}, "matching regex"),
    ({"extra": True}, "unknown field"),
    ({"description": "x" * 3000}, "length <= 2000"),
])
def test_malformed_reports_are_refused(change: dict[str, object], message: str) -> None:
    raw = {**msgspec.to_builtins(rep(3)), **change}
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, FaultReport)


@given(st.binary(max_size=300))
def test_relay_batch_decoder_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError):
        msgspec.json.decode(data, type=RelayBatch)


# ---- dedup, order, outbox ---------------------------------------------------------------


@given(st.lists(st.integers(1, 40), max_size=200))
def test_watermarks_take_each_seq_at_most_once_and_in_order(seqs: list[int]) -> None:
    w = Watermarks()
    taken = [s for s in seqs if w.accept(rep(s))]
    assert taken == sorted(set(taken))
    assert w.get(f"C/{INC}") == (max(seqs) if seqs else 0)


@given(st.integers(1, 50), st.integers(0, 60), st.integers(1, 20))
def test_outbox_gives_what_a_relay_lacks(n: int, watermark: int, limit: int) -> None:
    ob = Outbox(retention=30)
    for s in range(1, n + 1):
        ob.append(rep(s))
    got = [r.seq for r in ob.after(watermark, limit)]
    oldest = max(1, n - 29)
    expect = list(range(max(watermark + 1, oldest), n + 1))[:limit]
    assert got == expect
    assert ob.pruned == n - len(ob.reports)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["raise", "send", "fail", "kill", "heal"]),
                          st.sampled_from(["A", "B"])), max_size=80))
def test_relay_simulation_delivers_every_report_once_in_order(
        steps: list[tuple[str, str]]) -> None:
    """C's outbox, two relays with logs, a host following both: whatever links fail and
    whichever relay is chosen, once links heal the host has every report exactly once,
    in seq order."""
    outbox = Outbox()
    relay_marks = {n: Watermarks() for n in "AB"}
    relay_logs: dict[str, list[FaultReport]] = {n: [] for n in "AB"}
    up = {"A": True, "B": True}
    views = {n: RelayView(reachable=True, subscribers=1) for n in "AB"}
    inbox = Inbox()
    host_seen: list[int] = []
    cursors = {"A": 0, "B": 0}
    route: str | None = None

    def host_reads() -> None:
        for n in "AB":
            for r in relay_logs[n][cursors[n]:]:
                if inbox.receive(r, 0.0) is not None:
                    host_seen.append(r.seq)
            cursors[n] = len(relay_logs[n])

    def send(lose_ack: bool = False) -> None:
        nonlocal route
        for _ in range(10):
            route = choose_route("C", ["A", "B"], views, 0, route)
            if route is None:
                return
            if not up[route]:
                views[route].reachable = False
                continue
            pending = outbox.after(views[route].watermark, 3)
            if not pending:
                return
            for r in pending:
                if relay_marks[route].accept(r):
                    relay_logs[route].append(r.via(route, 0.0))
            if not lose_ack:
                views[route].watermark = relay_marks[route].get(pending[0].stream)

    for op, node in steps:
        if op == "raise":
            outbox.append(rep(outbox.last_seq + 1))
            send()
        elif op == "send":
            send()
        elif op == "fail":
            send(lose_ack=True)
        elif op == "kill":
            up[node] = False
        else:
            up[node] = True
            views[node].reachable = True
        host_reads()
    for n in "AB":
        up[n] = True
        views[n].reachable = True
    send()
    host_reads()
    assert host_seen == list(range(1, outbox.last_seq + 1))


# ---- rate limit -------------------------------------------------------------------------


@settings(max_examples=100)
@given(st.integers(1, 2000), st.integers(1, 10), st.floats(0.0, 5.0))
def test_storm_keeps_first_and_last_and_counts_everything(n: int, burst: int,
                                                          spread: float) -> None:
    rl = RateLimiter(burst=burst, window=10.0)
    out: list[FaultDraft] = []
    for i in range(n):
        out += rl.offer(draft(t=i * spread / n, n=i + 1), i * spread / n)
    out += rl.tick(100.0)
    assert out[0].description == "storm #1"
    assert sum(d.count for d in out) == n
    assert len(out) <= burst + 1
    assert out[-1].description.startswith(f"storm #{n}")
    assert rl.tick(200.0) == [] and not rl.windows


def test_rate_limit_is_per_kind_and_subject() -> None:
    rl = RateLimiter(burst=1, window=1.0)
    assert len(rl.offer(draft("a"), 0.0)) == 1
    assert rl.offer(draft("a"), 0.1) == []
    assert len(rl.offer(draft("b"), 0.1)) == 1
    assert len(rl.offer(draft("a", subject="vol2"), 0.1)) == 1
    summary = rl.tick(1.5)
    assert [d.count for d in summary] == [1] and summary[0].kind == "a"


def test_limiter_key_table_is_bounded() -> None:
    rl = RateLimiter(burst=1, window=100.0, max_keys=8)
    for i in range(100):
        rl.offer(draft(subject=str(i)), float(i))
    assert len(rl.windows) <= 8


# ---- relay choice -------------------------------------------------------------------------


names = st.sampled_from(["A", "B", "C", "D"])


@given(st.lists(names, unique=True, max_size=4), names,
       st.dictionaries(names, st.tuples(st.booleans(), st.integers(0, 2))),
       st.integers(0, 2), st.none() | names)
def test_route_is_a_reachable_candidate_preferring_hosts(
        candidates: list[str], me: str, raw: dict[str, tuple[bool, int]], local: int,
        current: str | None) -> None:
    views = {n: RelayView(reachable=r, subscribers=s) for n, (r, s) in raw.items() if n != me}
    route = choose_route(me, candidates, views, local, current)

    def up(n: str) -> bool:
        return n == me or (n in views and views[n].reachable)

    def hosts(n: str) -> bool:
        return local > 0 if n == me else n in views and views[n].subscribers > 0

    served = [n for n in candidates if up(n) and hosts(n)]
    if route is None:
        assert not any(up(n) for n in candidates)
        return
    assert route in candidates and up(route)
    if served:
        assert route in served  # never park reports where no host listens when one does
        if current in served:
            assert route == current  # sticky: no flapping between relays


def test_route_prefers_self_then_path_order() -> None:
    v = {"A": RelayView(True, 1), "B": RelayView(True, 1)}
    assert choose_route("C", ["A", "B"], v, 0, None) == "A"
    assert choose_route("B", ["A", "B"], v, 1, None) == "B"
    v["A"].reachable = False
    assert choose_route("C", ["A", "B"], v, 0, "A") == "B"
    v["A"].reachable = True
    assert choose_route("C", ["A", "B"], v, 0, "B") == "B"  # stays after A returns


# ---- detectors ----------------------------------------------------------------------------


def test_threshold_has_hysteresis() -> None:
    t = Threshold(0.9, 0.97, margin=0.02)
    assert [t.update(v) for v in (0.5, 0.91, 0.895, 0.97, 0.96, 0.94, 0.87)] == [
        None, "warning", None, "critical", None, "warning", "ok"]


def test_flapping_after_count_losses_in_window_once() -> None:
    f = Flapping(count=3, window=10.0)
    assert [f.down("B", t) for t in (0.0, 1.0, 2.0, 3.0, 20.0, 21.0, 22.0)] == [
        False, False, True, False, False, False, True]


@pytest.mark.parametrize("ev, component, kind, severity", [
    ({"type": "peer_down", "peer": "B", "reason": "ping timeout"}, "peer_link",
     "peer_link_down", "error"),
    ({"type": "pair_state", "pair": "p", "state": "suspended", "previous": "mirrored"},
     "pair", "pair_suspended", "error"),
    ({"type": "io_mode", "volume": "v", "mode": "block", "previous": "mirror"}, "volume",
     "volume_blocked", "warning"),
    ({"type": "verify_mismatch", "pair": "p", "chunks": 3}, "checksum", "verify_mismatch",
     "error"),
    ({"type": "witness_unreachable", "error": "refused"}, "witness", "witness_unreachable",
     "warning"),
    ({"type": "journal_overflow", "group": "g1", "used": 10, "capacity": 10}, "journal",
     "journal_overflow", "critical"),
    ({"type": "remote_stalled", "group": "g1", "reason": "applied nothing"}, "journal",
     "remote_copy", "error"),
    ({"type": "remote_catch_up", "group": "g1", "reason": "resynced"}, "journal",
     "remote_copy", "warning"),
])
def test_events_become_faults(ev: dict[str, object], component: str, kind: str,
                              severity: str) -> None:
    d = from_event({"node": "A", "time": 1.0, **ev})
    assert d is not None and (d.component, d.kind, d.severity) == (component, kind, severity)
    assert d.description


def test_a_far_copy_that_caught_up_clears_its_fault() -> None:
    d = from_event({"node": "A", "time": 1.0, "type": "journal_resumed", "group": "g1"})
    assert d is not None and (d.kind, d.state, d.subject) == ("remote_copy", "cleared", "g1")


def test_non_fault_events_are_ignored() -> None:
    assert from_event({"type": "volume_created", "volume": "v"}) is None
    # A standby that tracks chunks for records it lacks is no fault of the far copy.
    assert from_event({"type": "standby_bitmap", "group": "g1", "reason": "gap"}) is None
    assert from_event({"type": "io_mode", "mode": "mirror", "previous": "local"}) is None
    # A copy target blocked by design (far copy, local secondary, initial copy) is no fault.
    assert from_event({"type": "io_mode", "mode": "block", "previous": "local",
                       "volume": "v", "expected": True}) is None
    assert from_event({"type": "io_mode", "mode": "block", "previous": "local",
                       "volume": "v"}) is not None


def test_syslog_line_is_rfc5424_with_severity() -> None:
    line = syslog_line(rep(1), facility=3).decode()
    assert line.startswith("<27>1 ") and "error raised disk/io_error on C: #1" in line
