"""The data path's typed messages: mirrored and forwarded writes (single and batched),
copy chunks and flushes round-trip through a frame header (and through the wire
decoder, straight into their types), and a malformed frame from a buggy or hostile peer
is refused naming the field, before a byte is written."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinvol.replication import data_messages as dm
from twinvol.replication.messages import BadMessage
from twinvol.replication.wire import FrameDecoder, encode

offsets = st.integers(min_value=0, max_value=2**50)
lengths = st.integers(min_value=0, max_value=2**25)


@given(offsets, lengths, st.integers(min_value=-1, max_value=2**40), st.booleans())
def test_round_trips(off: int, n: int, j: int, zero: bool) -> None:
    for msg in (dm.Write("p", cmd=1, off=off, length=n, flags=1, j=j),
                dm.Write("p", cmd=1, off=off, length=n, fwd=7),
                dm.Forward("p", cmd=1, off=off, length=n),
                dm.Copy("p", off=off, length=n, j=max(j, 0), zero=zero),
                dm.Flush("p")):
        header = {**dm.encode(msg), "id": 5}   # what the link adds
        got = dm.decode(header)
        assert got == type(msg)(**{**{f: getattr(msg, f) for f in msg.__struct_fields__},
                                   "id": 5})
    rows = [[3, 1, off, n, 0, 0, j], [4, 3, off, n, 0, 2, dm.NONE]]
    batch = dm.decode({"t": "wb", "pair": "p", "rows": rows})
    assert isinstance(batch, dm.WriteBatch)
    assert [(r.rid, r.off, r.n, r.fwd, r.j) for r in batch.rows] == \
        [(3, off, n, 0, j), (4, off, n, 2, dm.NONE)]
    fwd = dm.decode({"t": "fwb", "pair": "p", "rows": [[9, 1, off, n, 0, 1]]})
    assert isinstance(fwd, dm.ForwardBatch) and fwd.rows[0].hold == 1


def test_a_single_write_frame_keeps_its_wire_names_and_omits_defaults() -> None:
    assert dm.encode(dm.Write("p", cmd=1, off=4096, length=512)) == \
        {"t": "w", "pair": "p", "cmd": 1, "off": 4096, "len": 512}


MALFORMED = [
    ({"t": "wb", "pair": "p", "rows": [[1, 1, -4096, 4096, 0, 0, -1]]}, "at `$.rows[0][2]`"),
    ({"t": "wb", "pair": "p", "rows": [[1, 1, 0, 4096, 0, 0]]}, "at `$.rows[0]`"),
    ({"t": "wb", "pair": "p", "rows": "x"}, "Expected `array`"),
    ({"t": "fwb", "pair": "p", "rows": [[1, 1, 0, -1, 0, 1]]}, "at `$.rows[0][3]`"),
    ({"t": "w", "pair": "p", "cmd": 1, "off": 0}, "missing required field `len`"),
    ({"t": "w", "pair": "", "cmd": 1, "off": 0, "len": 1}, "length >= 1"),
    ({"t": "copy", "pair": "p", "off": 0, "len": 1, "evil": 1}, "unknown field `evil`"),
    ({"t": "copy", "pair": "p", "off": "0", "len": 1}, "Expected `int`"),
]


@pytest.mark.parametrize(("header", "error"), MALFORMED)
def test_malformed_frames_are_refused_with_the_field(header: dict[str, object],
                                                     error: str) -> None:
    with pytest.raises(BadMessage, match="malformed") as e:
        dm.decode(header)
    assert error in str(e.value)


def _through_the_wire(header: dict[str, object]) -> object:
    [(got, payload)] = FrameDecoder(typed=True).feed(b"".join(encode(header, b"data")))
    assert payload == b"data"
    return got


def test_the_wire_decodes_data_frames_straight_into_their_types() -> None:
    for msg in (dm.Write("p", cmd=1, off=4096, length=4, j=3), dm.Copy("p", off=0, length=4,
                                                                         zero=True),
                dm.Flush("p")):
        assert _through_the_wire({**dm.encode(msg), "id": 9}) == \
            type(msg)(**{**{f: getattr(msg, f) for f in msg.__struct_fields__}, "id": 9})
    batch = _through_the_wire({"t": "wb", "pair": "p", "rows": [[3, 1, 0, 4, 0, 0, -1]]})
    assert isinstance(batch, dm.WriteBatch) and batch.rows[0] == dm.WriteRow(3, 1, 0, 4, 0, 0, -1)
    # Other frames stay dicts, for their own handlers.
    assert _through_the_wire({"t": "acks", "ids": [1, 2]}) == {"t": "acks", "ids": [1, 2]}
    assert _through_the_wire({"t": "hash", "pair": "p", "chunks": [1]}) == \
        {"t": "hash", "pair": "p", "chunks": [1]}


@pytest.mark.parametrize(("header", "error"), MALFORMED)
def test_a_malformed_data_frame_reaches_the_handler_to_be_refused(header: dict[str, object],
                                                                   error: str) -> None:
    got = _through_the_wire(header)
    assert got == header   # not typed: the handler's decode names the field
    with pytest.raises(BadMessage, match="malformed") as e:
        dm.decode(got)  # type: ignore[arg-type]
    assert error in str(e.value)
