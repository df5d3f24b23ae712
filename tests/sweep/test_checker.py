"""The sweep's checker on hand-made histories (no processes)."""

from __future__ import annotations

from .blocks import BLOCK, decode, encode
from .checker import Op, Report, check

A1, A2, A3 = 1 << 32 | 1, 1 << 32 | 2, 1 << 32 | 3


def w(wid: int, send: float, answer: float | None, block: int = 0, client: str = "agent",
      status: str = "ok") -> Op:
    return Op(client, 0, "w", block, wid, send, answer, status if answer is not None
              else "timeout")


def r(value: int | str | None, send: float, answer: float, block: int = 0,
      client: str = "agent", status: str = "ok") -> Op:
    return Op(client, 1, "r", block, value, send, answer, status)


def final(*values: int | str) -> dict[str, list[int | str] | None]:
    return {"A": list(values), "B": list(values)}


def counts(rep: Report) -> dict[str, int]:
    return {k: len(v) for k, v in rep.findings.items() if v}


def test_blocks_round_trip_and_reject_foreign_content() -> None:
    data = encode(7, A1)
    assert len(data) == BLOCK and decode(7, data) == A1
    assert decode(7, bytes(BLOCK)) == 0
    assert decode(8, data) == f"?misplaced:7:{A1}"
    assert decode(7, data[:100] + encode(7, A2)[100:]) == "?torn"
    assert decode(7, b"\x01" * BLOCK) == "?garbage"


def test_clean_history_passes() -> None:
    ops = [w(A1, 1.0, 1.1), r(A1, 1.2, 1.3), w(A2, 1.4, 1.5), r(A2, 1.6, 1.7)]
    rep = check(ops, final(A2))
    assert rep.ok, rep.findings
    assert (rep.ops, rep.writes, rep.acked_writes, rep.reads) == (4, 2, 2, 2)


def test_read_of_older_write_after_newer_was_acknowledged_is_stale() -> None:
    # A1 done before A2 was sent; A2 acknowledged before the read was sent.
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.3), r(A1, 1.4, 1.5, client="B")]
    rep = check(ops, final(A2))
    assert counts(rep) == {"stale": 1}
    assert "via B" in rep.findings["stale"][0].message


def test_zeros_after_an_acknowledged_write_are_stale() -> None:
    ops = [w(A1, 1.0, 1.1), r(0, 1.2, 1.3)]
    assert counts(check(ops, final(A1))) == {"stale": 1}


def test_concurrent_writes_may_be_read_in_either_order() -> None:
    # A1 and A2 overlap in time: the storage may order them either way.
    ops = [w(A1, 1.0, 1.3), w(A2, 1.1, 1.2), r(A1, 1.4, 1.5), r(A2, 1.6, 1.7)]
    assert check(ops, final(A2)).ok
    # A read concurrent with the newer write may still return the older value.
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.5), r(A1, 1.3, 1.4), r(A1, 1.45, 1.6)]
    assert check(ops, final(A2)).ok


def test_write_acknowledged_after_the_read_was_sent_does_not_make_it_stale() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.35), r(A1, 1.3, 1.4)]
    assert check(ops, final(A2)).ok


def test_unanswered_or_failed_write_may_appear_any_time_later() -> None:
    ops = [w(A1, 1.0, None, client="B"), w(A2, 1.1, 1.2), r(A1, 5.0, 5.1),
           w(A3, 6.0, 6.1, status="err", client="A")]
    rep = check(ops, final(A3))
    assert rep.ok, rep.findings
    assert rep.unavailable == 2


def test_unanswered_write_is_never_required() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, None, client="A"), r(A1, 2.0, 2.1)]
    assert check(ops, final(A1)).ok


def test_content_no_write_produced_is_corrupt() -> None:
    ops = [w(A1, 1.0, 1.1), r("?torn", 1.2, 1.3), r(A3, 1.4, 1.5),
           r(A1, 1.6, 1.7, block=5)]
    rep = check(ops, final(A1, 0, 0, 0, 0, 0))
    assert counts(rep) == {"corrupt": 3}


def test_read_of_a_write_sent_after_the_read_was_answered_is_corrupt() -> None:
    ops = [r(A1, 1.0, 1.1), w(A1, 1.2, 1.3)]
    assert counts(check(ops, final(A1))) == {"corrupt": 1}


def test_acknowledged_write_missing_from_both_copies_is_lost() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.3)]
    rep = check(ops, final(A1))
    assert counts(rep) == {"lost": 1}
    assert f"{A2:#x}" in rep.findings["lost"][0].message
    assert counts(check([w(A1, 1.0, 1.1)], final(0))) == {"lost": 1}


def test_overwritten_or_concurrently_replaced_write_is_not_lost() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.3), w(A3, 1.25, None, client="B")]
    assert check(ops, final(A3)).ok  # A3 may have landed after A2


def test_write_kept_on_one_copy_only_is_divergent_not_lost() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 1.3)]
    rep = check(ops, {"A": [A2], "B": [A1]})
    assert counts(rep) == {"divergent": 1}


def test_verify_mismatches_count_as_divergent() -> None:
    rep = check([w(A1, 1.0, 1.1)], final(A1), verify_mismatches=2)
    assert counts(rep) == {"divergent": 1}
    assert "2 mismatched" in rep.findings["divergent"][0].message


def test_any_failure_through_the_agent_is_an_error_direct_ones_are_unavailable() -> None:
    ops = [w(A1, 1.0, 1.1, status="err"), w(A2, 1.2, None),
           Op("agent", 0, "c", -1, None, 2.0, 2.1, "err", "refused"),
           r(None, 3.0, 3.1, client="A", status="err"),
           Op("B", 0, "c", -1, None, 2.0, 2.1, "err", "refused")]
    rep = check(ops, final(0))
    assert counts(rep) == {"errors": 3}
    assert rep.unavailable == 2


def test_unreadable_final_copy_is_a_note_and_fails_the_run() -> None:
    rep = check([w(A1, 1.0, 1.1)], {"A": [A1], "B": None})
    assert not any(rep.findings.values())
    assert not rep.ok and "B" in rep.notes[0]


def test_op_from_logged_line() -> None:
    op = Op.from_line(["B", 2, "r", 9, A1, 1.5, None, "timeout", "no answer"])
    assert op == Op("B", 2, "r", 9, A1, 1.5, None, "timeout", "no answer")
    assert not op.acked


def test_agent_gap_and_slowest_request() -> None:
    ops = [w(A1, 1.0, 1.1), w(A2, 1.2, 3.6), w(A3, 3.7, 3.8), r(A3, 4.0, 4.2, client="A"),
           r(A3, 4.0, 7.0, client="A")]
    rep = check(ops, final(A3))
    assert (rep.agent_write_gap, rep.agent_gap_at) == (2.5, 1.1)
    assert abs(rep.agent_slowest - 2.4) < 1e-9
