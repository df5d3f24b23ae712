"""The consistency-group journal: order, bounds, torn tails and corruption."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from twinvol.storage.journal import (
    Journal,
    JournalCorrupt,
    JournalError,
    JournalFull,
    Record,
    decode_records,
    encode_record,
)


def flip(path: str, pos: int, bit: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ bit]))


def rec(seq: int, data: bytes = b"x" * 100, pair: str = "p") -> Record:
    return Record(seq=seq, pair=pair, cmd=1, flags=0, offset=seq * 4096, length=len(data),
                  time=1000.0 + seq, data=data)


def test_append_read_roundtrip_and_reopen(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    for s in range(1, 51):
        j.append(rec(s, bytes([s]) * (s * 10)))
    assert (j.first, j.last) == (1, 50)
    got = list(j.iter_from(7))
    assert [r.seq for r in got] == list(range(7, 51))
    assert got[0].data == bytes([7]) * 70
    j.close()
    j2 = Journal(str(tmp_path), limit=1 << 20)
    assert (j2.first, j2.last, j2.corrupt_at) == (1, 50, None)
    assert j2.read(50)[0] == rec(50, bytes([50]) * 500)


def test_record_time_reads_only_the_header(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    for s in range(1, 4):
        j.append(rec(s))
    assert j.record_time(2) == 1002.0
    assert j.record_time(9) is None


def test_sequence_must_follow(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    j.append(rec(5))
    with pytest.raises(JournalError, match="does not follow 5"):
        j.append(rec(7))


def test_full_and_trim_frees_space(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=256 * 1024)
    seq = 0
    with pytest.raises(JournalFull):
        while True:
            seq += 1
            j.append(rec(seq, b"y" * 4096))
    held = j.last
    assert j.size <= 256 * 1024
    freed = j.trim(held - 5)
    assert freed > 0 and j.first > 1
    assert j.holds(held - 5, held)
    j.append(rec(held + 1, b"y" * 4096))       # room again
    with pytest.raises(JournalError, match="no longer holds"):
        j.read(1)


def test_trim_everything_then_continue(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    for s in range(1, 4):
        j.append(rec(s))
    j.trim(3)
    assert (j.first, j.last, j.size) == (0, 0, 0)
    j.append(rec(4))
    j.close()
    assert Journal(str(tmp_path), limit=1 << 20).first == 4


def test_torn_tail_is_dropped(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    for s in range(1, 4):
        j.append(rec(s))
    j.close()
    seg = os.path.join(tmp_path, sorted(os.listdir(tmp_path))[-1])
    with open(seg, "ab") as f:
        f.write(encode_record(rec(4))[:-10])        # a crash in the middle of an append
    j2 = Journal(str(tmp_path), limit=1 << 20)
    assert (j2.last, j2.corrupt_at, j2.cut_tail) == (3, None, True)
    j2.append(rec(4))
    assert j2.read(4)[0].seq == 4


def test_flipped_byte_is_found(tmp_path: str) -> None:
    j = Journal(str(tmp_path), limit=1 << 20)
    for s in range(1, 11):
        j.append(rec(s))
    seg = os.path.join(tmp_path, sorted(os.listdir(tmp_path))[0])
    flip(seg, len(encode_record(rec(1))) * 5 + 60)    # inside record 6's data
    # A running journal finds it when reading ...
    with pytest.raises(JournalCorrupt, match="record 6") as e:
        list(j.iter_from(1))
    assert e.value.seq == 5
    assert [r.seq for r in j.read(1, seq_to=5)] == [1, 2, 3, 4, 5]
    j.close()
    # ... and a reopened one stops before it and refuses to append past it.
    j2 = Journal(str(tmp_path), limit=1 << 20)
    assert (j2.last, j2.corrupt_at) == (5, 6)
    with pytest.raises(JournalCorrupt):
        j2.append(rec(11))


def test_a_damaged_receive_journal_is_cut_before_the_damage_and_goes_on(tmp_path: str) -> None:
    """The far site's journal: records from the damaged one on are fetched again, so
    the journal ends before it (later segments too) and takes them in order again."""
    j = Journal(str(tmp_path), limit=1 << 20)
    j.segment_bytes = len(encode_record(rec(1))) * 4   # segments of four records
    for s in range(1, 13):
        j.append(rec(s))
    j.close()
    assert len(os.listdir(tmp_path)) == 3
    seg = os.path.join(tmp_path, sorted(os.listdir(tmp_path))[1])   # records 5-8
    flip(seg, len(encode_record(rec(1))) * 2 + 60)    # inside record 7's data
    j2 = Journal(str(tmp_path), limit=1 << 20)
    assert (j2.last, j2.corrupt_at) == (6, 7)
    assert j2.drop_damaged() == 7
    assert (j2.last, j2.corrupt_at, len(os.listdir(tmp_path))) == (6, None, 2)
    for s in range(7, 10):
        j2.append(rec(s, data=b"y" * 100))
    j2.close()
    j3 = Journal(str(tmp_path), limit=1 << 20)
    assert [(r.seq, r.data[:1]) for r in j3.iter_from(5)] == \
        [(5, b"x"), (6, b"x"), (7, b"y"), (8, b"y"), (9, b"y")]
    assert j3.drop_damaged() is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=12), st.data())
def test_any_flipped_byte_never_yields_a_wrong_record(payloads: list[bytes],
                                                      data: st.DataObject) -> None:
    records = [rec(i + 1, p) for i, p in enumerate(payloads)]
    blob = bytearray(b"".join(encode_record(r) for r in records))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        got, _ = decode_records(blob)
    except JournalCorrupt:
        return
    # Whatever decodes must be exactly what was written, in order.
    assert got == records[:len(got)]
    assert len(got) < len(records)   # the damaged record itself never decodes


def test_reopen_after_random_damage_never_serves_wrong_data() -> None:
    for cut in range(0, 400, 37):
        with tempfile.TemporaryDirectory() as d:
            j = Journal(d, limit=1 << 20)
            written = [rec(s, bytes([s]) * 50) for s in range(1, 8)]
            for r in written:
                j.append(r)
            j.close()
            seg = os.path.join(d, os.listdir(d)[0])
            with open(seg, "r+b") as f:
                f.seek(cut)
                b = f.read(1)
                if b:
                    f.seek(cut)
                    f.write(bytes([b[0] ^ 1]))
            j2 = Journal(d, limit=1 << 20)
            assert list(j2.iter_from(1)) == written[:j2.last]


class JournalMachine(RuleBasedStateMachine):
    """Random appends, trims, reopens and crashes (a torn tail, as a kill during an append
    leaves it): the journal always holds exactly the records appended and not trimmed,
    in order, and never serves a record that was not written."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.j = Journal(self.dir, limit=64 * 1024)
        self.model: dict[int, Record] = {}
        self.next = 1
        self.trimmed = 0

    @rule(size=st.integers(0, 3000), fill=st.integers(0, 255))
    def append(self, size: int, fill: int) -> None:
        r = rec(self.next, bytes([fill]) * size)
        try:
            self.j.append(r)
        except JournalFull:
            assert self.j.size + len(encode_record(r)) > self.j.limit
            return
        self.model[r.seq] = r
        self.next += 1

    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        upto = data.draw(st.integers(0, self.next))
        self.j.trim(upto)
        # Only whole segments go: everything above `upto` is still there.
        for s in list(self.model):
            if s not in self.j.index:
                assert s <= upto
                del self.model[s]

    @rule()
    def reopen(self) -> None:
        self.j.close()
        self.j = Journal(self.dir, limit=64 * 1024)

    @rule(cut=st.integers(1, 200))
    def crash_during_append(self, cut: int) -> None:
        """A record half written at the end of the newest segment, then a restart."""
        r = rec(self.next, b"z" * 500)
        self.j.close()
        segs = sorted(os.listdir(self.dir))
        if not segs:
            return
        with open(os.path.join(self.dir, segs[-1]), "ab") as f:
            f.write(encode_record(r)[:cut])
        self.j = Journal(self.dir, limit=64 * 1024)
        assert self.j.corrupt_at is None

    @invariant()
    def holds_exactly_the_model(self) -> None:
        if not self.model:
            assert self.j.last in (0, self.next - 1)
            return
        first = min(self.model)
        assert (self.j.first, self.j.last) == (first, self.next - 1)
        assert list(self.j.iter_from(first)) == [self.model[s] for s in sorted(self.model)]

    def teardown(self) -> None:
        self.j.close()
        shutil.rmtree(self.dir, ignore_errors=True)


JournalMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                            deadline=None)
test_journal_state_machine = JournalMachine.TestCase
