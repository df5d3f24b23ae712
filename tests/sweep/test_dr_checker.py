"""The DR checker on crafted histories: each check accepts what a correct takeover and
failback may show, and fires on what they must not."""

from __future__ import annotations

from typing import Any

from .checker import Op, Value
from .dr_checker import (
    check_equal,
    check_failback_report,
    check_feed,
    check_lost_report,
    check_present,
    check_served,
    check_takeover,
    check_takeover_report,
    extent_chunks,
    flushed_before,
)


def w(wid: int, block: int, send: float, answer: float | None, status: str = "ok",
      client: str = "agent", thread: int = 0) -> Op:
    return Op(client, thread, "w", block, wid, send, answer, status)


def f(send: float, answer: float, client: str = "agent", thread: int = 0) -> Op:
    return Op(client, thread, "f", -1, None, send, answer, "ok")


def r(value: Value, block: int, send: float, answer: float, client: str = "C") -> Op:
    return Op(client, 1, "r", block, value, send, answer, "ok")


# One writer: w1 (block 0), w2 (block 1), flush, w3 (block 0), w4 (block 2), each
# acknowledged before the next is sent.
SERIAL = [w(1, 0, 0.0, 1.0), w(2, 1, 2.0, 3.0), f(3.1, 3.5), w(3, 0, 4.0, 5.0),
          w(4, 2, 6.0, 7.0)]


def kinds(values: list[Value], rp_time: float, disaster: float = 8.0,
          lag_bound: float = 10.0, ops: list[Op] | None = None) -> list[str]:
    return sorted(x.kind for x in check_takeover(ops or SERIAL, values, 3, rp_time,
                                                 disaster, lag_bound, 0.01, 9.0))


def test_the_prefix_at_the_recovery_point_passes() -> None:
    # the recovery point is w2's number (given between its send and its answer)
    assert kinds([1, 2, 0], rp_time=2.5) == []
    assert kinds([3, 2, 0], rp_time=4.5) == []
    assert kinds([3, 2, 4], rp_time=6.5) == []
    assert kinds([0, 0, 0], rp_time=-1.0) == []


def test_a_write_acknowledged_before_the_recovery_point_must_be_kept() -> None:
    # w2 was acknowledged at 3.0, before the recovery point at 4.5, but C lacks it
    assert kinds([1, 0, 0], rp_time=4.5) == ["kept"]
    msg = check_takeover(SERIAL, [1, 0, 0], 3, 4.5, 8.0, 10.0, 0.01, 9.0)[0].message
    assert "write 0x2" in msg and "recovery point 3" in msg


def test_c_must_not_hold_a_write_sent_after_the_recovery_point() -> None:
    # C holds w3, sent at 4.0, but reports a recovery point at 3.5
    assert kinds([3, 2, 0], rp_time=3.5) == ["ahead"]
    # within the clock margin it is not decidable
    assert kinds([3, 2, 0], rp_time=3.995) == []


def test_a_mix_fires_even_at_a_plausible_recovery_point() -> None:
    # w3 without w2 is no prefix (w2 was acknowledged before w3 was sent)
    assert "mix" in kinds([3, 0, 0], rp_time=4.5)


def test_flushed_writes_must_be_there_unless_recent() -> None:
    # the flush (answered 3.5) covers w1 and w2; a recovery point at 0.5 lost them
    assert kinds([0, 0, 0], rp_time=0.5, disaster=20.0, lag_bound=10.0) == ["lag", "lag"]
    # the same loss 5 s after the flush is within the lag bound
    assert kinds([0, 0, 0], rp_time=0.5, disaster=8.5, lag_bound=10.0) == []


def test_a_flush_covers_only_its_own_threads_earlier_writes() -> None:
    ops = [w(1, 0, 0.0, 1.0), w(2, 1, 0.5, 4.0, thread=1), f(2.0, 2.5)]
    assert set(flushed_before(ops, 10.0)) == {0}
    assert flushed_before(ops, 2.0) == {}


def test_unanswered_writes_may_be_in_or_out() -> None:
    ops = [*SERIAL, w(5, 3, 6.5, None, "timeout")]
    assert kinds([3, 2, 4, 0], rp_time=6.6, ops=ops) == []
    assert kinds([3, 2, 4, 5], rp_time=6.6, ops=ops) == []


GOOD_REPORT: dict[str, Any] = {"action": "serve", "recovery_point": {"sequence": 7,
                                                                      "time": 1000.0},
                               "lost": {"sequences": 2, "last_written": 9}}
VIEW: dict[str, Any] = {"sequence": {"applied": 7}, "state": "takeover", "io_mode": "local"}


def test_the_takeover_report_must_match_c() -> None:
    assert check_takeover_report(GOOD_REPORT, VIEW, 5.0, 0.01, 996.0) == []
    assert [x.kind for x in check_takeover_report(
        GOOD_REPORT, {**VIEW, "sequence": {"applied": 8}}, 5.0, 0.01, 996.0)] == ["report"]
    assert check_takeover_report(GOOD_REPORT, {**VIEW, "io_mode": "block"}, 5.0, 0.01, 996.0)
    # a recovery point in the future of the command
    assert check_takeover_report(GOOD_REPORT, VIEW, 3.0, 0.01, 996.0)
    assert check_takeover_report({**GOOD_REPORT, "action": "none"}, VIEW, 5.0, 0.01, 996.0)
    assert check_takeover_report({**GOOD_REPORT, "lost": {"sequences": 0,
                                                          "last_written": 6}},
                                 VIEW, 5.0, 0.01, 996.0)


def test_c_serves_hosts_after_its_takeover() -> None:
    base: list[Value] = [1, 2, 0]
    ops = [w(9, 0, 10.0, 10.1, client="C"), r(9, 0, 10.2, 10.3), r(2, 1, 10.2, 10.3),
           r(0, 2, 10.4, 10.5)]
    assert check_served(ops, base) == []
    # a read of block 0 after C's write was acknowledged returns the old data
    assert [x.kind for x in check_served([*ops, r(1, 0, 10.6, 10.7)], base)] == ["served"]
    # a read returns data C did not hold at its takeover (a write it had lost)
    assert check_served([*ops, r(5, 2, 10.6, 10.7)], base)
    # a failed request through C, or no write at all
    assert check_served([*ops, w(10, 1, 11.0, 11.1, "err", client="C")], base)
    assert check_served([r(2, 1, 10.2, 10.3)], base)


def test_acknowledged_writes_must_be_present() -> None:
    ops = [*SERIAL, w(9, 2, 10.0, 10.1, client="C")]
    assert check_present(ops, [3, 2, 9], "A", sent_after=9.0) == []
    # A after failback lacks C's write: it holds w4, acknowledged before w9 was sent
    assert [x.kind for x in check_present(ops, [3, 2, 4], "A", sent_after=9.0)] == ["lost"]
    # writes before the window may be rolled back (the failback undoes A's tail)
    assert check_present(ops, [1, 2, 9], "A", sent_after=9.0) == []
    assert check_present(ops, [1, 2, 9], "A")
    assert check_present(ops, None, "A")


def test_sites_must_be_equal() -> None:
    a = bytes(8192)
    assert check_equal({"A": a, "B": a, "C": a}, "x") == []
    got = check_equal({"A": a, "B": a, "C": bytes(4096) + b"\1" * 4096}, "x")
    assert [(x.kind, x.block) for x in got] == [("diverged", 1)]
    assert check_equal({"A": a, "C": None}, "x")


def test_the_standby_feeds_only_what_the_far_copy_lacks() -> None:
    ok = {"action": "feed", "method": "journal", "records": 40, "full_copy": False}
    assert check_feed(ok, "feed", 50, 10) == []
    assert check_feed({**ok, "records": 51}, "feed", 50, 10)
    assert check_feed({**ok, "full_copy": True}, "feed", 50, 10)
    bits = {"action": "feed", "method": "bitmap", "chunks": 10, "full_copy": False}
    assert check_feed(bits, "feed", 50, 10) == []
    assert check_feed({**bits, "chunks": 11}, "feed", 50, 10)
    assert check_feed(ok, "return", 50, 10)
    # every chunk copied is fine when the writes since touched every chunk ...
    assert check_feed({**bits, "chunks": 128, "full_copy": True}, "feed", 9000, 128) == []
    # ... and needless when they did not
    assert check_feed({**bits, "chunks": 128, "full_copy": True}, "feed", 90, 40)


def test_the_failback_report_matches_the_takeover_and_cs_writes() -> None:
    ok = {"from": "C", "recovery_point": 7, "chunks": 4,
          "pairs": {"sweep-dr": {"changed_here": 3, "changed_there": 2}}}
    assert check_failback_report(ok, 7, (2, 3), 5) == []
    assert check_failback_report(ok, 8, (2, 3), 5)
    assert check_failback_report(ok, 7, (3, 3), 5)
    assert check_failback_report(ok, 7, (2, 3), 3)
    assert check_failback_report({**ok, "from": "A"}, 7, (2, 3), 5)


def lost(sequences: int, seconds: float, known_until: float | None = 100.0
         ) -> dict[str, Any]:
    return {"recovery_point": {"sequence": 3},
            "lost": {"sequences": sequences, "seconds": seconds, "lower_bound": True,
                     "known_until": known_until}}


def test_the_takeover_must_not_understate_what_was_lost() -> None:
    # w3 and w4 were acknowledged and sent after the recovery point at 3.5: both lost
    assert check_lost_report(SERIAL, lost(2, 2.6), 3.5, 0.01) == []
    low = lost(1, 2.6)
    assert [x.kind for x in check_lost_report(SERIAL, low, 3.5, 0.01)] == ["understated"]
    assert check_lost_report(SERIAL, lost(2, 1.0), 3.5, 0.01)
    assert check_lost_report(SERIAL, lost(0, 0), 7.5, 0.01) == []


def test_lost_is_a_lower_bound_up_to_the_feeders_last_word() -> None:
    # the feeder last reported at 6.5 (clients' clock 5.5 with offset 1): w4, acknowledged
    # at 7.0, was never reported to C, so only w3 counts
    assert check_lost_report(SERIAL, lost(1, 1.5, 6.5), 3.5, 0.01, offset=1.0) == []
    assert check_lost_report(SERIAL, lost(0, 0, 6.5), 3.5, 0.01, offset=1.0)
    # never heard since C started: nothing can be held against it
    assert check_lost_report(SERIAL, lost(0, 0, None), 3.5, 0.01) == []
    # a report that does not say it is a lower bound is a finding
    bare = {"lost": {"sequences": 2, "seconds": 2.6}}
    assert [x.kind for x in check_lost_report(SERIAL, bare, 3.5, 0.01)] == ["report"]


def test_extent_chunks_cover_whole_activity_log_extents_within_the_volume() -> None:
    assert extent_chunks([w(1, 5, 0.0, 1.0)], 2048) == set(range(64))
    assert extent_chunks([w(1, 1030, 0.0, 1.0), f(1.0, 2.0)], 1500) == set(range(64, 94))
    assert extent_chunks([], 2048) == set()
