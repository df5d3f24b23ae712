"""Persistent bitmaps: the dirty bitmap (chunks the partner lacks) and the activity log.

A bit is durable before the write it covers is applied, so after a crash every
chunk that may differ between the copies is known: the dirty bitmap records
chunks written while the partner was away, and the activity log records the
extents that had writes in flight while mirrored (DRBD's activity log), which
recovery folds into the dirty bitmap.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor

CHUNK = 64 * 1024          # resync granularity
AL_EXTENT = 4 * 1024 * 1024  # activity-log granularity


PAGE = 4096                 # bitmap bytes written together by a sync
PAGE_BITS_SHIFT = 15        # bit index -> page (PAGE * 8 bits a page)
_NONZERO = re.compile(rb"[^\x00]")   # finds the next byte with a bit set, at C speed
_NOTFULL = re.compile(rb"[^\xff]")   # ... with a bit clear


class PersistentBits:
    """A bit array kept in a file; `sync` makes the in-memory bits durable."""

    def __init__(self, path: str, nbits: int) -> None:
        self.path = path
        self.nbits = nbits
        size = (nbits + 7) // 8
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        data = os.pread(self.fd, size, 0)
        self.bits = bytearray(data) + bytearray(size - len(data))
        # Bits past nbits (a corrupt or foreign file) are ignored, never trusted.
        self._dirty = False
        # Pages (of PAGE bytes) changed since the last sync: a sync writes only those, so
        # a copy's checkpoints cost by what they cleared, not by the volume's size.
        self._pages: set[int] = set()
        self._sync_task: asyncio.Future[None] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def resize(self, nbits: int) -> None:
        size = (nbits + 7) // 8
        if size > len(self.bits):
            self.bits += bytearray(size - len(self.bits))
        self.nbits = nbits
        self._touch_all()

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> bool:
        """Set bit i; True if it changed."""
        b = 1 << (i & 7)
        if self.bits[i >> 3] & b:
            return False
        self.bits[i >> 3] |= b
        self._dirty = True
        self._pages.add(i >> PAGE_BITS_SHIFT)
        return True

    def set_many(self, idx: Iterable[int]) -> bool:
        if isinstance(idx, range) and idx.step == 1:  # a copy's span: no loop per bit
            return self.fill(idx.start, idx.stop, True)
        changed = False
        for i in idx:
            changed |= self.set(i)
        return changed

    def clear(self, i: int) -> None:
        b = 1 << (i & 7)
        if self.bits[i >> 3] & b:
            self.bits[i >> 3] &= ~b & 0xFF
            self._dirty = True
            self._pages.add(i >> PAGE_BITS_SHIFT)

    def fill(self, start: int, stop: int, on: bool) -> bool:
        """Set (or clear) bits [start, stop) a byte at a time: a copy clears the span of
        a whole hole at once. True if any bit changed."""
        stop = min(stop, self.nbits)
        if start >= stop:
            return False
        bits = self.bits
        lo, hi = (start + 7) >> 3, stop >> 3     # whole bytes inside the span
        if lo >= hi:                            # within one or two bytes
            return self._fill_bits(start, stop, on)
        full = (b"\xff" if on else b"\x00") * (hi - lo)
        changed = bits[lo:hi] != full
        if changed:
            bits[lo:hi] = full
        changed |= self._fill_bits(start, lo << 3, on)
        changed |= self._fill_bits(hi << 3, stop, on)
        if changed:
            self._dirty = True
            self._pages.update(range(start >> PAGE_BITS_SHIFT, ((stop - 1) >> PAGE_BITS_SHIFT) + 1))
        return changed

    def _fill_bits(self, start: int, stop: int, on: bool) -> bool:
        changed = False
        for i in range(start, stop):
            if on:
                changed |= self.set(i)
            elif self.test(i):
                self.clear(i)
                changed = True
        return changed

    def next_set(self, start: int, stop: int | None = None) -> int:
        """The first set bit in [start, stop), else `stop` (default and at most `nbits`);
        zero bytes are skipped in C."""
        return self._next(start, stop, 0, _NONZERO)

    def next_clear(self, start: int, stop: int | None = None) -> int:
        """The first clear bit in [start, stop), else `stop` (a bounded search: a copy
        asks from every span, and an unbounded one would scan to the end each time)."""
        return self._next(start, stop, 0xFF, _NOTFULL)

    def _next(self, start: int, stop: int | None, flip: int, other: re.Pattern[bytes]) -> int:
        bits = self.bits
        stop = self.nbits if stop is None else min(stop, self.nbits)
        i = start >> 3
        if start >= stop:
            return stop
        v = ((bits[i] ^ flip) >> (start & 7)) << (start & 7)
        if not v:
            m = other.search(bits, i + 1, (stop + 7) >> 3)
            if m is None:
                return stop
            i = m.start()
            v = bits[i] ^ flip
        return min((i << 3) + (v & -v).bit_length() - 1, stop)

    def merge(self, other: bytes | bytearray | memoryview) -> None:
        """Set every bit set in `other` (a partner's bitmap, same layout); bits past
        `nbits` are ignored, never trusted."""
        n = min(len(other), len(self.bits))
        if n == 0:
            return
        mine = int.from_bytes(self.bits[:n], "little")
        theirs = int.from_bytes(other[:n], "little") & ((1 << min(n * 8, self.nbits)) - 1)
        merged = mine | theirs
        if merged != mine:
            self.bits[:n] = merged.to_bytes(n, "little")
            self._touch_all()

    def set_all(self) -> None:
        self.fill(0, self.nbits, True)

    def clear_all(self) -> None:
        if any(self.bits):
            self.bits[:] = bytes(len(self.bits))
            self._touch_all()

    def count(self) -> int:
        """Set bits below nbits (a popcount: the API asks often, volumes can be large)."""
        full, rest = divmod(self.nbits, 8)
        total = int.from_bytes(self.bits[:full], "little").bit_count()
        if rest:
            total += (self.bits[full] & ((1 << rest) - 1)).bit_count()
        return total

    def iter_set(self, start: int = 0) -> Iterator[int]:
        bits = self.bits
        for byte_i in range(start >> 3, len(bits)):
            v = bits[byte_i]
            if not v:
                continue
            for j in range(8):
                i = (byte_i << 3) | j
                if i >= self.nbits:
                    return
                if i >= start and v & (1 << j):
                    yield i

    def _touch_all(self) -> None:
        self._dirty = True
        self._pages.update(range((len(self.bits) + PAGE - 1) // PAGE))

    @property
    def durable(self) -> bool:
        """Every set bit is on disk (nothing changed since the last completed sync)."""
        return not self._dirty and self._sync_task is None

    def sync_now(self) -> None:
        """Write and fdatasync the bits (blocking)."""
        if not self._dirty:
            return
        self._dirty = False
        # One write per page: a larger write makes the page cache hold the file in folios
        # as large as the write (ext4), and a later sync of one changed page then writes
        # back the whole folio: 2 MiB per checkpoint of a 1 TiB copy (bench/scale.py).
        pages, self._pages = sorted(self._pages), set()
        bits, fd = self.bits, self.fd
        for page in pages:
            a = page * PAGE
            os.pwrite(fd, bytes(bits[a:a + PAGE]), a)
        os.fdatasync(self.fd)

    async def sync(self, executor: Executor) -> None:
        """Make the current bits durable; concurrent callers share one fdatasync."""
        while True:
            task = self._sync_task
            if task is not None and task.done():
                self._sync_task = None
                task.result()
                continue
            if task is None:
                if not self._dirty:
                    return
                loop = asyncio.get_running_loop()
                task = self._sync_task = loop.run_in_executor(executor, self.sync_now)
            await asyncio.shield(task)


def chunks_of(offset: int, length: int, unit: int = CHUNK) -> range:
    if length <= 0:
        return range(0)
    return range(offset // unit, (offset + length - 1) // unit + 1)


def nchunks(size: int, unit: int = CHUNK) -> int:
    return (size + unit - 1) // unit


def extent_chunks(ext: int, size: int) -> range:
    """The chunks of activity-log extent `ext` in a volume of `size` bytes."""
    per = AL_EXTENT // CHUNK
    return range(ext * per, min((ext + 1) * per, nchunks(size)))
