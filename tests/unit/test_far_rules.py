"""The far copy's ordering rules in the core (shared by the node and the simulator): a
standby never numbers from a count it did not see, keeps only records in order, and a
takeover ships records only when its journal truly covers what the far copy lacks."""

from __future__ import annotations

from twinvol.replication.core import far
from twinvol.replication.core.far import StandbyStep


def test_a_standby_numbers_only_alone_and_from_a_count_it_saw() -> None:
    assert far.standby_write(alone=True, journaling=True, seq_seen=7) is StandbyStep.NUMBER
    # just demoted (seq_seen 0): it could reuse numbers the far copy holds
    assert far.standby_write(True, True, 0) is StandbyStep.TO_BLOCKS
    # mirrored: the feeder numbers the write without telling
    assert far.standby_write(False, True, 7) is StandbyStep.TO_BLOCKS
    assert far.standby_write(True, True, 7, readable=False) is StandbyStep.TO_BLOCKS
    assert far.standby_write(True, False, 7) is StandbyStep.MARK


def test_a_standby_keeps_records_only_in_order() -> None:
    assert far.standby_keeps(True, 0, 12)         # the first one it sees
    assert far.standby_keeps(True, 12, 13)
    assert not far.standby_keeps(True, 12, 14)    # a gap
    assert not far.standby_keeps(True, 12, 12)    # a repeat
    assert not far.standby_keeps(False, 12, 13)   # tracking by chunks
    assert far.standby_caught_up(True, 20, 20) and not far.standby_caught_up(False, 20, 20)
    assert not far.standby_caught_up(True, 19, 20)
    assert far.after_copy_chunk(seq_seen=5, bitmap_until=3, written=4, j=9) == (9, 9)


def test_a_takeover_ships_records_only_when_they_cover_the_gap() -> None:
    def plan(**kw: object) -> far.TakeoverPlan:
        args = {"journaling": True, "seq_seen": 30, "received": 20, "holds_gap": True,
                "dirty": 0, "bitmap_until": 0, "far_mirrored": True, "far_chunked": 0}
        args.update(kw)
        return far.takeover_plan(**args)  # type: ignore[arg-type]
    assert plan().journal
    assert not plan(holds_gap=False).journal
    assert "lacks records after 20" in plan(holds_gap=False).reason
    assert plan(seq_seen=20, holds_gap=False).journal   # nothing past the far copy's point
    assert not plan(far_chunked=3).journal
    assert not plan(journaling=False).journal
    # dirty chunks for writes the far copy already applied do not stop the journal
    assert plan(dirty=4, bitmap_until=18).journal
    assert not plan(dirty=4, bitmap_until=far.BITS_NEEDED).journal
    assert not plan(dirty=4, bitmap_until=18, far_mirrored=False).journal


def test_catch_up_bits_close_once_their_writes_are_committed() -> None:
    assert far.chunk_bits_close(True, 50, 50)
    assert not far.chunk_bits_close(True, 49, 50)
    assert not far.chunk_bits_close(False, 60, 50)


def test_the_standbys_unnumbered_chunks_get_a_bound_only_when_every_write_is_answered(
        ) -> None:
    need = far.BITS_NEEDED
    assert far.standby_bound(need, True, 0, 0, 812) == 812
    assert far.standby_bound(need, True, 3, 0, 812) == need    # writes still in flight
    assert far.standby_bound(need, True, 0, 2, 812) == need    # a write failed: resync first
    assert far.standby_bound(need, False, 0, 0, 812) == need   # not mirrored
    assert far.standby_bound(40, True, 0, 0, 812) == 40        # numbers known: kept
