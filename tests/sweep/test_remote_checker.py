"""The three-site checker on crafted histories: each check accepts what a correct far copy
may show, and fires on what it must not."""

from __future__ import annotations

from typing import Any

from .checker import Op, Value
from .remote_checker import (
    History,
    Poll,
    Sample,
    check_final,
    check_regress,
    check_remote,
    check_sample,
    check_untracked,
    find_stalls,
)


def w(wid: int, block: int, send: float, answer: float | None, status: str = "ok") -> Op:
    return Op("agent", 0, "w", block, wid, send, answer, status)


# w1 then w2 then w3, each acknowledged before the next was sent; w3 overwrites block 0.
SERIAL = [w(1, 0, 0.0, 1.0), w(2, 1, 2.0, 3.0), w(3, 0, 4.0, 5.0)]


def kinds(h: History, values: list[Value], claimed: str = "mirrored", at: float = 10.0
          ) -> list[str]:
    return [f.kind for f in check_sample(h, Sample(at, values, claimed))]


def test_every_prefix_of_a_serial_history_passes() -> None:
    h = History(SERIAL)
    for values in ([0, 0], [1, 0], [1, 2], [3, 2]):
        assert kinds(h, list(values)) == [], values


def test_a_mix_of_two_prefixes_fires() -> None:
    h = History(SERIAL)
    # block 1 holds w2, but w1 (block 0) was acknowledged before w2 was sent
    assert kinds(h, [0, 2]) == ["mix"]
    # block 0 holds w3, but w2 (block 1) was acknowledged before w3 was sent
    assert kinds(h, [3, 0]) == ["mix"]
    msg = check_sample(h, Sample(10.0, [3, 0], "mirrored", applied=7))[0].message
    assert "write 0x2" in msg and "write 0x3" in msg and "applied 7" in msg


def test_a_catch_up_that_says_so_is_not_required_to_be_a_prefix() -> None:
    h = History(SERIAL)
    assert kinds(h, [3, 0], claimed="copying") == []
    assert kinds(h, [3, 0], claimed="unknown") == []


def test_writes_in_flight_may_fall_either_way() -> None:
    # w1 was sent before w2 and answered after it: their order is unknown
    h = History([w(1, 0, 0.0, 5.0), w(2, 1, 1.0, 2.0), w(3, 2, 6.0, 7.0)])
    assert kinds(h, [0, 2, 0]) == []
    assert kinds(h, [1, 0, 0]) == []
    # but w3 was sent after both were acknowledged
    assert kinds(h, [0, 2, 3]) == ["mix"]
    assert kinds(h, [1, 0, 3]) == ["mix"]
    # an unanswered write may or may not have been applied, at any time after it was sent
    h = History([w(1, 0, 0.0, None, "timeout"), w(2, 1, 2.0, 3.0), w(3, 0, 4.0, 4.5, "err")])
    for values in ([0, 0], [1, 0], [0, 2], [1, 2], [3, 2]):
        assert kinds(h, list(values)) == [], values
    # a failed write that was applied still came after what was acknowledged before it
    assert kinds(h, [3, 0]) == ["mix"]


def test_concurrent_writes_to_one_block() -> None:
    # w1 and w2 to block 0 overlap in time; w3 to block 1 comes after both
    h = History([w(1, 0, 0.0, 2.0), w(2, 0, 1.0, 3.0), w(3, 1, 4.0, 5.0)])
    assert kinds(h, [1, 3]) == []  # w1 applied after w2
    assert kinds(h, [2, 3]) == []
    assert kinds(h, [0, 3]) == ["mix"]


def test_foreign_content_and_writes_from_the_future_are_corrupt() -> None:
    h = History(SERIAL)
    assert kinds(h, ["?torn", 0]) == ["corrupt"]
    assert kinds(h, [2, 0]) == ["corrupt"]          # w2 belongs to block 1
    assert kinds(h, [0, 99]) == ["corrupt"]         # nobody wrote 0x63
    assert kinds(h, [3, 2], at=3.5) == ["corrupt"]  # w3 was sent at 4.0


def test_going_back_in_time_fires() -> None:
    h = History(SERIAL)
    a, b = Sample(10.0, [3, 2], "mirrored"), Sample(11.0, [1, 2], "copying")
    assert [f.kind for f in check_regress(h, a, b)] == ["regress"]
    assert check_regress(h, b, a) == []
    assert [f.kind for f in check_regress(h, a, Sample(11.0, [0, 2], "mirrored"))] == \
        ["regress"]


def view(state: str, written: int, applied: int, feeder: str = "A") -> dict[str, Any]:
    return {"group_state": state, "journal_mode": "journal", "feeder": feeder,
            "sequence": {"written": written, "sent": applied, "received": applied,
                         "applied": applied}}


def polls(states: dict[str, str], written: int, applied: list[int], step: float = 0.5
          ) -> list[Poll]:
    return [Poll(i * step, {n: view(s, written, a) for n, s in states.items()})
            for i, a in enumerate(applied)]


MIRRORED = {"A": "mirrored", "B": "mirrored", "C": "mirrored"}


def test_a_silent_stall_fires() -> None:
    stuck = polls(MIRRORED, 50, [10] * 30)             # 14.5 s without progress
    found = find_stalls(stuck, [], stall=10.0)
    assert [f.kind for f in found] == ["stall"]
    assert "past 10" in found[0].message


def test_no_stall_when_progressing_idle_faulted_or_reported() -> None:
    assert find_stalls(polls(MIRRORED, 50, list(range(30))), [], 10.0) == []
    assert find_stalls(polls(MIRRORED, 10, [10] * 30), [], 10.0) == []   # nothing pending
    # a fault was active for a while: no quiet stretch of 10 s
    assert find_stalls(polls(MIRRORED, 50, [10] * 30), [{"start": 4.0, "end": 6.0}],
                       10.0) == []
    # the feeder says it is not mirrored: a stall it reports is not silent
    said = {**MIRRORED, "A": "copying"}
    assert find_stalls(polls(said, 50, [10] * 30), [], 10.0) == []
    # a side that does not answer claims nothing either
    gone = [Poll(p.at, {**p.views, "B": None}) for p in polls(MIRRORED, 50, [10] * 30)]
    assert find_stalls(gone, [], 10.0) == []


def test_final_lag_and_divergence() -> None:
    assert check_final(b"x" * 8192, b"x" * 8192, "A", 3.0, 30.0) == []
    assert [f.kind for f in check_final(b"x" * 8192, b"x" * 8192, "A", None, 30.0)] == ["lag"]
    assert [f.kind for f in check_final(b"x" * 8192, b"x" * 8192, "A", 31.0, 30.0)] == ["lag"]
    found = check_final(b"x" * 4096 + b"y" * 4096, b"x" * 8192, "A", 1.0, 30.0)
    assert [f.kind for f in found] == ["diverged"] and found[0].block == 1


def test_check_remote_counts_and_combines() -> None:
    samples = [Sample(10.0, [1, 2], "mirrored"), Sample(11.0, [3, 0], "mirrored"),
               Sample(12.0, [1, 2], "copying")]
    rep = check_remote(SERIAL, samples, polls(MIRRORED, 50, [10] * 30), [], 10.0)
    assert (rep.samples, rep.checked) == (3, 2)
    assert {k: len(v) for k, v in rep.findings.items() if v} == {
        "mix": 1, "regress": 2, "stall": 1}
    assert not rep.ok
    assert check_remote(SERIAL, samples[:1], [], [], 10.0).ok


def test_far_copy_changing_without_records_while_claiming_mirrored_fires() -> None:
    a = Sample(10.0, [1, 2], "mirrored", applied=5, received=(5, 5))
    b = Sample(11.0, [3, 2], "mirrored", applied=5, received=(5, 5))
    quiet = [Poll(10.5, {"C": view("mirrored", 9, 5)})]
    assert [f.kind for f in check_untracked(a, b, quiet)] == ["untracked"]
    # records arrived in between, or C said it was copying, or nothing changed: fine
    moved = Sample(11.0, [3, 2], "mirrored", applied=5, received=(6, 6))
    assert check_untracked(a, moved, quiet) == []
    said = [Poll(10.5, {"C": view("copying", 9, 5)})]
    assert check_untracked(a, b, said) == []
    assert check_untracked(a, Sample(11.0, [1, 2], "mirrored", received=(5, 5)), quiet) == []
    assert check_untracked(a, Sample(11.0, [3, 2], "copying", received=(5, 5)), quiet) == []
