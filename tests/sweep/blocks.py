"""The content of a sweep block: which write produced it, readable from the bytes alone.

Every write puts a distinct value in a 4 KiB block: a 32-byte record (magic, block
number, write id, checksum) repeated 128 times. A read then maps back to exactly one
write (or to the initial zeros), and torn, misplaced or foreign content is told apart.
Plain stdlib only: the libnbd clients import it under the system python.
"""

from __future__ import annotations

import struct
import zlib

BLOCK = 4096
MAGIC = b"twsweep1"
_REC = struct.Struct("<8sQQQ")
REPEAT = BLOCK // _REC.size


def _check(block: int, wid: int) -> int:
    return zlib.crc32(struct.pack("<QQ", block, wid)) | 0x5EE9 << 32


def encode(block: int, wid: int) -> bytes:
    """The bytes write `wid` (> 0) stores in `block`."""
    return _REC.pack(MAGIC, block, wid, _check(block, wid)) * REPEAT


def decode(block: int, data: bytes) -> int | str:
    """The write id found in `block` (0: never written), or "?reason" for content that no
    write of this block produced."""
    if len(data) != BLOCK:
        return f"?short:{len(data)}"
    if data.count(0) == BLOCK:
        return 0
    first = data[:_REC.size]
    if first * REPEAT != data:
        return "?torn"
    magic, blk, wid, check = _REC.unpack(first)
    if magic != MAGIC or check != _check(blk, wid) or wid == 0:
        return "?garbage"
    if blk != block:
        return f"?misplaced:{blk}:{wid}"
    return int(wid)
