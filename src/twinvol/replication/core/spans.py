"""How a copy walks a thin volume: a span of dirty chunks that reads as zeroes goes as
one "zero this range" message, so the copy costs by what is allocated, not by the size."""

from __future__ import annotations

import re

_NONZERO = re.compile(rb"[^\x00]")
ZERO_SPAN = 4096   # chunks in one zero message (256 MiB): the target punches it at once


def zero_chunks(first: int, run_end: int, zeroes_end: int, size: int, chunk: int) -> int:
    """How many chunks from `first` (dirty up to chunk `run_end`) lie wholly in the
    zeroes that start at chunk `first` and end at byte `zeroes_end`; the volume's last
    chunk may be short (`size` bytes in all). 0: chunk `first` holds data."""
    whole = zeroes_end >= min(run_end * chunk, size)   # zeroes to the run's (volume's) end
    n = run_end - first if whole else zeroes_end // chunk - first
    return max(0, min(n, ZERO_SPAN))


def data_chunk_bits(runs: list[tuple[int, int]], first: int, count: int, chunk: int) -> bytes:
    """A bitmap of chunks [first, first + count): bit i is set when chunk first + i
    holds any byte of the data runs ([start, stop) byte ranges)."""
    bits = 0
    for start, stop in runs:
        a = max(start // chunk, first) - first
        b = min(-(-stop // chunk), first + count) - first
        if b > a:
            bits |= ((1 << (b - a)) - 1) << a
    return bits.to_bytes((count + 7) // 8, "little")


def set_bits(buf: bytes | bytearray, base: int = 0) -> list[int]:
    """`base` + the index of every set bit of `buf` (zero bytes are skipped in C)."""
    out: list[int] = []
    for m in _NONZERO.finditer(buf):
        i = m.start()
        v = buf[i]
        while v:
            low = v & -v
            out.append(base + (i << 3) + low.bit_length() - 1)
            v ^= low
    return out
