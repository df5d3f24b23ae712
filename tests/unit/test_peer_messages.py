"""Typed control messages between pair sides: round trips, and malformed traffic refused
with the field that is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinvol.replication.messages import (
    TAGS,
    BadMessage,
    HashRequest,
    LeaseRequest,
    PairDone,
    PairStateMsg,
    PairSwap,
    decode,
    decode_reply,
    encode,
)

names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20)


@given(st.lists(names, max_size=5), names, st.sampled_from(["primary", "secondary"]),
       st.lists(st.integers(0, 10**6), max_size=50), st.integers(0, 2**40))
def test_round_trips(pairs: list[str], pair: str, role: str, chunks: list[int], j: int) -> None:
    for msg in (LeaseRequest(pairs), PairSwap(pair, role),  # type: ignore[arg-type]
                HashRequest(pair, chunks),
                PairDone(pair, "g1", ["g0"], role, j),  # type: ignore[arg-type]
                PairStateMsg(pair, "g1", [], role, "mirrored", "mirror")):  # type: ignore[arg-type]
        header = {**encode(msg), "id": 7, "_peer": "A"}  # what the link adds
        assert decode(header) == msg


@pytest.mark.parametrize(("header", "error"), [
    ({"t": "pair_swap", "pair": "p"}, "missing required field `role`"),
    ({"t": "pair_swap", "pair": "p", "role": "boss"}, "at `$.role`"),
    ({"t": "hash", "pair": "p", "chunks": [1, -2]}, "at `$.chunks[1]`"),
    ({"t": "hash", "pair": "p", "chunks": list(range(5000))}, "length <= 4096"),
    ({"t": "lease", "pairs": "p"}, "Expected `array`"),
    ({"t": "pair_split", "pair": ""}, "length >= 1"),
    ({"t": "pair_split", "pair": "p", "extra": 1}, "unknown field `extra`"),
    ({"t": "pair_prepare", "pair": "p", "volume": "v", "partner_volume": "v", "size": 0,
      "serial": "s", "vvol_id": 1, "export_name": "e", "description": "", "gen": "g"},
     "Expected `int` >= 1"),
])
def test_malformed_messages_are_refused_with_the_field(header: dict[str, object],
                                                       error: str) -> None:
    with pytest.raises(BadMessage, match="malformed") as e:
        decode(header)
    assert error in str(e.value)


def test_every_tag_decodes_to_its_type_and_replies_drop_the_link_tag() -> None:
    assert {"lease", "pair_state", "pair_done", "hash"} <= TAGS
    reply = {"t": "resp", "id": 3, **encode(PairStateMsg("p", "g", ["f"], "secondary",
                                                      "suspended", "block"))}
    got = decode_reply(reply, PairStateMsg)
    assert got.role == "secondary" and got.history == ["f"]
    with pytest.raises(BadMessage, match="malformed reply"):
        decode_reply({"t": "resp", "id": 3, "pair": "p"}, PairStateMsg)
