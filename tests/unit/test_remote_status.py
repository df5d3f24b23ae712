"""What each side of a remote copy says about it (issue 15: a status that tells the truth)."""

from __future__ import annotations

import pathlib

from twinvol.replication.remote_status import STALE_AFTER, group_view
from twinvol.replication.runtime import GroupRecord, GroupRuntime
from twinvol.storage.journal import Journal


def group(tmp: pathlib.Path, **fields: object) -> GroupRuntime:
    rec = GroupRecord(name="g", role="secondary", target="C", feeder="A", **fields)  # type: ignore[arg-type]
    return GroupRuntime(rec, Journal(str(tmp / "j"), 1 << 20))


def test_a_target_that_has_not_heard_from_its_feeder_says_its_numbers_are_stale(
        tmp_path: pathlib.Path) -> None:
    g = group(tmp_path, state="mirrored", written=7, applied=7)
    g.last_heard = 100.0
    v = group_view(g, "C", 0.0, 100.0 + STALE_AFTER - 1)
    assert v["group_state"] == "mirrored" and "stale" not in v
    assert v["feeder_heard_seconds_ago"] == STALE_AFTER - 1
    v = group_view(g, "C", 0.0, 112.0)
    assert v["stale"] is True
    assert v["reason"] == "no word from the feeder A for 12 s: these numbers may be old"
    g.last_heard = 0.0  # restarted, never heard since
    assert group_view(g, "C", 0.0, 5.0)["reason"].endswith(
        "since this node started: these numbers may be old")
    g.journal.close()


def test_a_far_copy_taken_over_is_the_primary_of_what_it_serves(
        tmp_path: pathlib.Path) -> None:
    g = group(tmp_path, state="takeover", reason="taken over at C")
    v = group_view(g, "C", 0.0, 1000.0)
    assert (v["group_role"], v["served_at"], v["group_state"]) == ("primary", "C", "takeover")
    assert "stale" not in v
    g.journal.close()


def test_the_feeder_reports_lag_and_journal_fill(tmp_path: pathlib.Path) -> None:
    g = group(tmp_path, state="mirrored", written=3, applied=1, written_time=50.0,
              applied_time=40.0)
    g.rec.role = "primary"
    v = group_view(g, "A", 60.0, 0.0)
    assert v["lag"] == {"sequences": 2, "seconds": 10.0, "bytes": 0}
    assert v["journal"]["fill"] == 0.0 and "feeder_heard_seconds_ago" not in v
    g.journal.close()
