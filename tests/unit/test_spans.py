"""How a copy and verify walk a thin volume: bitmap spans found and filled a byte at a
time agree with a plain list of bits, a zero span never swallows a chunk holding data,
and the data map marks exactly the chunks a data run touches."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from twinvol.replication.bitmap import PersistentBits
from twinvol.replication.core.spans import ZERO_SPAN, data_chunk_bits, set_bits, zero_chunks

ops = st.lists(st.tuples(st.integers(0, 140), st.integers(0, 140), st.booleans()), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 130), ops)
def test_fill_and_next_agree_with_a_list_of_bits(tmp_path_factory: object, nbits: int,
                                                 steps: list[tuple[int, int, bool]]) -> None:
    path = Path(tmp_path_factory.mktemp("bits")) / "b"  # type: ignore[attr-defined]
    bits = PersistentBits(str(path), nbits)
    ref = [False] * nbits
    for a, b, on in steps:
        lo, hi = min(a, b), max(a, b)
        want = any(ref[i] != on for i in range(lo, min(hi, nbits)))
        assert bits.fill(lo, hi, on) == want
        for i in range(lo, min(hi, nbits)):
            ref[i] = on
        assert [bits.test(i) for i in range(nbits)] == ref
        for s in range(nbits + 2):
            assert bits.next_set(s) == next((i for i in range(s, nbits) if ref[i]), nbits)
            assert bits.next_clear(s) == next((i for i in range(s, nbits) if not ref[i]), nbits)
            for e in (s + 1, s + 9, nbits + 5):
                end = min(e, nbits)
                assert bits.next_set(s, e) == next((i for i in range(s, end) if ref[i]), end)
                assert bits.next_clear(s, e) == next((i for i in range(s, end) if not ref[i]),
                                                     end)
    bits.sync_now()
    again = PersistentBits(str(path), nbits)
    assert [again.test(i) for i in range(nbits)] == ref


def test_a_whole_terabyte_bitmap_is_set_and_walked_at_once(tmp_path: Path) -> None:
    bits = PersistentBits(str(tmp_path / "b"), 1 << 24)   # 1 TiB in 64 KiB chunks
    bits.set_all()
    assert bits.count() == 1 << 24 and bits.next_clear(0) == 1 << 24
    bits.fill(0, 1 << 24, False)
    bits.set(12345678)
    assert bits.next_set(0) == 12345678 and bits.next_clear(12345678) == 12345679


def test_zero_spans() -> None:
    c = 64
    # zeroes from chunk 3 to byte 10*64: chunks 3..9 are whole zeroes
    assert zero_chunks(3, 100, 10 * c, 10_000, c) == 7
    assert zero_chunks(3, 100, 10 * c + 5, 10_000, c) == 7      # chunk 10 holds data
    assert zero_chunks(3, 100, 3 * c + 5, 10_000, c) == 0       # chunk 3 holds data
    assert zero_chunks(3, 6, 10 * c, 10_000, c) == 3            # the dirty run ends first
    assert zero_chunks(3, 5, 4 * c + 10, 4 * c + 10, c) == 2    # a short last chunk
    assert zero_chunks(0, 10 * ZERO_SPAN, 10 * ZERO_SPAN * c, 10**12, c) == ZERO_SPAN


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 900)), max_size=8),
       st.integers(0, 40), st.integers(1, 70))
def test_the_data_map_marks_exactly_the_chunks_data_touches(
        runs: list[tuple[int, int]], first: int, count: int) -> None:
    c = 100
    byte_runs = [(s, s + n) for s, n in runs]
    got = set_bits(data_chunk_bits(byte_runs, first, count, c), first)
    want = sorted({k for s, e in byte_runs for k in range(s // c, (e - 1) // c + 1)
                   if first <= k < first + count})
    assert got == want
