"""Reusable buffers for large write payloads.

A fresh 1 MiB `bytearray` costs more than the copy it receives: it is zero-filled
and, being large, comes from the kernel page by page. A node receives every large
write into a buffer (from an NBD client or a peer) that then lives on in views held
by the backing store call, the peer link's send queue or a journal until the write
completes. Rather than tracking each of those owners, the pool lends a buffer again
only when nothing but the pool refers to it (its reference count says so): a view,
a queued send or a stored record all keep it busy.
"""

from __future__ import annotations

import sys

MIN_POOLED = 64 * 1024          # smaller payloads are cheap to allocate
POOL_BYTES = 64 * 1024 * 1024   # idle buffers kept, in all size classes together


def _baseline() -> int:
    """References to a pooled buffer that is free: the pool's list, the loop variable
    and getrefcount's own argument (measured, not assumed)."""
    probe = [bytearray(1)]
    for buf in probe:
        return sys.getrefcount(buf)
    raise AssertionError  # pragma: no cover


_FREE = _baseline()


class BufferPool:
    """Buffers in power-of-two size classes; `get(n)` returns one of at least n bytes."""

    def __init__(self, max_bytes: int = POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._classes: dict[int, list[bytearray]] = {}

    def get(self, n: int) -> bytearray:
        if n < MIN_POOLED:
            return bytearray(n)
        size = 1 << (n - 1).bit_length()
        bufs = self._classes.get(size)
        if bufs is None:
            bufs = self._classes[size] = []
        getrefcount = sys.getrefcount
        for buf in bufs:
            if getrefcount(buf) == _FREE:
                return buf
        buf = bytearray(size)
        if self.bytes + size <= self.max_bytes:
            bufs.append(buf)
            self.bytes += size
        return buf


#: The process-wide pool (NBD payloads and peer-link payloads share it).
POOL = BufferPool()
