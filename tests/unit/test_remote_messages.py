"""Remote copy's typed messages: each round-trips through a frame header, and a
malformed one (from a buggy or hostile peer) is refused naming the field, before any
handler sees it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinvol.replication import remote_messages as rm
from twinvol.replication.core.types import GroupRole, GroupState
from twinvol.replication.messages import BadMessage
from twinvol.replication.runtime import GroupRecord

names = st.text(min_size=1, max_size=20)
seqs = st.integers(min_value=0, max_value=2**48)


@given(names, names, seqs, seqs, st.floats(min_value=0, max_value=2e9),
       st.sampled_from(list(GroupState)))
def test_round_trips(group: str, pair: str, a: int, b: int, t: float,
                     state: GroupState) -> None:
    for msg in (rm.Records(group, first=a, last=b, committed=a, written=b, wtime=t),
                rm.StatRequest(group, committed=b), rm.NewFeeder(group),
                rm.Progress(group, written=a, wtime=t, received=b, applied=a, atime=t,
                            state=state),
                rm.StandbyPrepare(group, pair=pair, volume=pair, target="C",
                                  target_volume=pair, journal_limit=1 << 20, gen="g",
                                  written=a),
                rm.Failback(group, pair=pair), rm.FailbackDone(group, received=a),
                rm.Resume(group, seq=a, time=t, committed=-1),
                rm.BitsRequest(group, pair=pair)):
        header = {**rm.encode(msg), "id": 9, "_peer": "A"}   # what the link adds
        assert rm.decode(header) == msg


@pytest.mark.parametrize(("header", "error"), [
    ({"t": "jr", "group": "g", "first": 1}, "missing required field `last`"),
    ({"t": "jr", "group": "g", "first": -1, "last": 2}, "at `$.first`"),
    ({"t": "jr", "group": "g", "first": "1", "last": 2}, "Expected `int`"),
    ({"t": "jstat", "group": ""}, "length >= 1"),
    ({"t": "jstat", "group": "g", "extra": 1}, "unknown field `extra`"),
    ({"t": "jprog", "group": "g", "written": 1, "wtime": 0.0, "received": 1, "applied": 1,
      "atime": 0.0, "state": "confused"}, "at `$.state`"),
    ({"t": "a_prepare", "group": "g", "pair": "p", "volume": "v", "partner_volume": "v",
      "size": 0, "serial": "s", "vvol_id": 1, "export_name": "e", "description": "",
      "gen": "g", "journal_limit": 1}, "Expected `int` >= 1"),
    ({"t": "jzz", "group": "g"}, "Invalid value 'jzz'"),
])
def test_malformed_messages_are_refused_with_the_field(header: dict[str, object],
                                                       error: str) -> None:
    with pytest.raises(BadMessage, match="malformed") as e:
        rm.decode(header)
    assert error in str(e.value)


def test_the_targets_answer_is_typed_and_a_bad_one_is_refused() -> None:
    rec = GroupRecord(name="g", role=GroupRole.SECONDARY, target="C", feeder="A",
                      state=GroupState.TAKEOVER, received=7, applied=5, applied_time=1.5)
    header, payload = rm.stat_reply(rec)
    got = rm.reply({"t": "resp", "id": 3, **header}, rm.Stat)
    assert (got.received, got.applied, got.state, got.feeder) == (7, 5, "takeover", "A")
    assert payload == b""
    with pytest.raises(BadMessage, match=r"malformed reply \(Stat\)"):
        rm.reply({"t": "resp", "id": 3, "received": 1}, rm.Stat)
