"""A request in flight, client side, and the checks each reply chunk must pass
against it (nbd/client.py frames the chunks and ends the connection on a violation).
"""

from __future__ import annotations

import struct
from typing import Any

from twinvol.nbd.client_events import Completed
from twinvol.nbd.constants import ERROR_PAYLOAD, MAX_STRING, Cmd, CmdFlag, Reply

_U32 = struct.Struct(">I")
_HOLE = struct.Struct(">QI")

# Spec: a block status chunk should stay under 4 + 8 * 2^20 bytes.
MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)
# Error chunks carry a message of at most 4096 bytes plus fixed fields.
MAX_ERROR_CHUNK = 6 + MAX_STRING + 8 + 1024

_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_REQ_ONE = int(CmdFlag.REQ_ONE)


class Pending(Completed):
    """One request in flight, and what its reply chunks said so far.

    It is the request's `Completed` event once the reply is whole (no second object
    per reply); `data` is the read buffer being filled until then. Each `claim` or
    `take_*` returns a violation's message, or None once the chunk is folded in.
    """

    __slots__ = ("covered", "flags", "length", "offset", "ranges")

    def __init__(self, tag: Any, cookie: int, command: int, flags: int, offset: int,
                 length: int) -> None:
        self.tag = tag
        self.cookie = cookie
        self.command = command
        self.error = 0
        self.message = ""
        self.data = None
        self.extents = None
        self.flags = flags
        self.offset = offset
        self.length = length
        self.covered = 0
        self.ranges: list[tuple[int, int]] | None = None  # content chunks seen so far

    def claim(self, offset: int, length: int) -> str | None:
        """A content chunk covers [offset, +length): inside the request, no overlap."""
        if offset < self.offset or offset + length > self.offset + self.length:
            return (f"chunk [{offset}, +{length}) lies outside the request "
                    f"[{self.offset}, +{self.length})")
        end = offset + length
        ranges = self.ranges
        if ranges is None:
            self.ranges = [(offset, end)]
            return None
        for lo, hi in ranges:
            if offset < hi and lo < end:
                return f"reply chunk [{offset}, +{length}) overlaps an earlier one"
        ranges.append((offset, end))
        return None

    def take_hole(self, payload: bytes | bytearray | memoryview) -> str | None:
        if self.command != _READ:
            return "NBD_REPLY_TYPE_OFFSET_HOLE for a request that is not a read"
        if len(payload) != 12:
            return "NBD_REPLY_TYPE_OFFSET_HOLE must be 12 bytes"
        offset, n = _HOLE.unpack_from(payload)
        if n == 0:
            return "NBD_REPLY_TYPE_OFFSET_HOLE of zero bytes"
        bad = self.claim(offset, n)
        if bad is not None:
            return bad
        self.covered += n
        if self.data is not None:  # buffers start zeroed; only bytes already written need it
            start = offset - self.offset
            self.data[start:start + n] = bytes(n)
        return None

    def take_status(self, payload: bytes | bytearray | memoryview,
                    meta_context_id: int | None) -> str | None:
        if self.command != _BLOCK_STATUS:
            return "NBD_REPLY_TYPE_BLOCK_STATUS for a request that is not block status"
        n = len(payload)
        if n < 12 or (n - 4) % 8:
            return f"NBD_REPLY_TYPE_BLOCK_STATUS of {n} bytes is not 4 + 8*k"
        (ctx,) = _U32.unpack_from(payload)
        if ctx != meta_context_id:
            return f"block status for context id {ctx}, which was not negotiated"
        if self.extents is not None:
            return "two block status chunks for one context"
        count = (n - 4) // 8
        flat = struct.unpack_from(f">{2 * count}I", payload, 4)
        extents = list(zip(flat[0::2], flat[1::2], strict=True))
        if any(e[0] == 0 for e in extents):
            return "block status extent of length zero"
        if self.flags & _REQ_ONE:
            # One extent, never past the request.
            extents = [(min(extents[0][0], self.length), extents[0][1])]
        self.extents = extents
        return None

    def take_error(self, kind: int, payload: bytes | bytearray | memoryview) -> str | None:
        fixed = 14 if kind == Reply.ERROR_OFFSET else 6
        if len(payload) < fixed:
            return f"error chunk of {len(payload)} bytes is too short"
        error, mlen = ERROR_PAYLOAD.unpack_from(payload)
        if mlen > len(payload) - fixed:
            return "error chunk message runs past the chunk"
        if error == 0:
            return "error chunk with error value 0"
        if not self.error:  # the first error is the one reported
            self.error = error
            self.message = bytes(payload[6:6 + mlen]).decode("utf-8", "replace")
        return None
