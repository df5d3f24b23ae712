"""Typed data-path messages between the two sides of a pair: mirrored writes, forwarded
writes, copy chunks and flushes.

The hot ones travel as batch frames (`wb`, `fwb`): one header, a row per write
(`array_like` structs, so a row stays a short list on the wire) and the writes' data
one after the other in the payload. `decode` checks every field before a handler sees
it (about 0.1 us a row), so a malformed frame is refused with the field it got wrong.
`id` (last in each) is the peer link's request id of a frame (rows carry their own).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from twinvol.replication.messages import BadMessage, Name

Offset = Annotated[int, msgspec.Meta(ge=0)]
Length = Annotated[int, msgspec.Meta(ge=0)]
NONE = -1  # `j` of a row: no journal sequence number


class _DMsg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, omit_defaults=True):
    pair: Name


class WriteRow(msgspec.Struct, array_like=True):
    """One mirrored write of a `wb` batch: `fwd` names a write this node forwarded and
    still holds the data of (else the data is next in the payload); `j` is the primary's
    journal sequence number (`NONE`: none)."""

    rid: int
    cmd: int
    off: Offset
    n: Length
    flags: int
    fwd: int
    j: int


class ForwardRow(msgspec.Struct, array_like=True):
    """One write the secondary forwards for the primary to order (`fwb` batch); `hold`:
    the sender keeps the data, so the mirrored write may refer to it by `rid`."""

    rid: int
    cmd: int
    off: Offset
    n: Length
    flags: int
    hold: int


class WriteBatch(_DMsg, tag="wb"):
    rows: list[WriteRow]
    id: int = 0


class ForwardBatch(_DMsg, tag="fwb"):
    rows: list[ForwardRow]
    id: int = 0


class Write(_DMsg, tag="w"):
    """A mirrored write in a frame of its own (FUA, or the general path)."""

    cmd: int
    off: Offset
    length: Length = msgspec.field(name="len")
    flags: int = 0
    j: int = NONE
    fwd: int = 0
    id: int = 0


class Forward(_DMsg, tag="fw"):
    """A write forwarded by the secondary on the general path."""

    cmd: int
    off: Offset
    length: Length = msgspec.field(name="len")
    flags: int = 0
    id: int = 0


class Copy(_DMsg, tag="copy"):
    """A chunk of an initial copy, resync or catch-up; `zero`: the chunk is a hole;
    `j`: the last journal sequence number the chunk reflects (a far copy's feeder)."""

    off: Offset
    length: Length = msgspec.field(name="len")
    j: int = 0
    zero: bool = False
    id: int = 0


class Flush(_DMsg, tag="flush"):
    id: int = 0


DataMsg = WriteBatch | ForwardBatch | Write | Forward | Copy | Flush
TAGS = frozenset({"wb", "fwb", "w", "fw", "copy", "flush"})


def decode(header: dict[str, Any]) -> DataMsg:
    """The typed message of a data-path frame header."""
    try:
        msg: DataMsg = msgspec.convert(header, DataMsg)
        return msg
    except msgspec.ValidationError as e:
        raise BadMessage(f"malformed {header.get('t')!r} message: {e}") from None


def encode(msg: DataMsg) -> dict[str, Any]:
    """The header that carries `msg` (the link adds the request id)."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out
