"""Typed control messages between the two sides of a pair (msgspec tagged unions).

A message travels as the header of a peer frame, tagged by its `t` field; `decode`
checks it field by field, so a malformed or unknown control message is refused with a
clear error instead of failing somewhere inside a handler. The data path's frames
(`w`, `wb`, `fw`, `fwb`, `copy`, `flush`) and remote copy's stay row-encoded for speed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Role = Literal["primary", "secondary"]
MAX_HASH_CHUNKS = 4096
MAX_MAP_CHUNKS = 16384   # chunks a data map answers for (1 GiB; a 2 KiB bitmap)


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    pass


class LeaseRequest(_Msg, tag="lease"):
    """May the sender serve these pairs for another lease period?"""

    pairs: list[Name]


class VolumeIdentity(_Msg):
    """What a node needs to take a volume's identity (serial, id, export name...): the
    active-active partner (`PairPrepare`) and the far site (`remote_messages.
    TargetPrepare`) both get it."""

    pair: Name
    volume: Name
    partner_volume: Name
    size: Annotated[int, msgspec.Meta(gt=0)]
    serial: str
    vvol_id: int
    export_name: str
    description: str
    gen: str


class PairPrepare(VolumeIdentity, tag="pair_prepare"):
    """The primary creates a pair: the receiver takes its identity and blocks hosts."""


class PairStateMsg(_Msg, tag="pair_state"):
    """Sent by the side that leads a meeting, and answered with the other side's."""

    pair: Name
    gen: str
    history: list[str]
    role: Role
    state: str
    io_mode: str
    copy_source: str = ""
    rebooted: bool = False   # this machine restarted since the copies last met


class PairDone(_Msg, tag="pair_done"):
    """The copy source finished: the receiver takes this generation and role."""

    pair: Name
    gen: str
    history: list[str]
    role: Role
    j: int = 0   # a far copy: the journal sequence the copy reflects
    committed: int = -1  # ... and every write up to here is on both active-active copies


class PairSplit(_Msg, tag="pair_split"):
    pair: Name


class PairDelete(_Msg, tag="pair_delete"):
    pair: Name


class PairYield(_Msg, tag="pair_yield"):
    """The operator chose the sender's data: stop serving and send the dirty bitmap."""

    pair: Name


class PairBlock(_Msg, tag="pair_block"):
    pair: Name
    reason: str = "blocked by the partner"


class PairUnblock(_Msg, tag="pair_unblock"):
    pair: Name


class PairSwap(_Msg, tag="pair_swap"):
    pair: Name
    role: Role   # the sender's role before the swap


class HashRequest(_Msg, tag="hash"):
    pair: Name
    chunks: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]],
                      msgspec.Meta(max_length=MAX_HASH_CHUNKS)]


class DataMapRequest(_Msg, tag="data_map"):
    """Which of chunks [first, first + count) hold data? Answered with a bitmap (bit i:
    chunk first + i), so `pair verify` reads only what either side allocated."""

    pair: Name
    first: Annotated[int, msgspec.Meta(ge=0)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_MAP_CHUNKS)]


Control = (LeaseRequest | PairPrepare | PairStateMsg | PairDone | PairSplit | PairDelete
           | PairYield | PairBlock | PairUnblock | PairSwap | HashRequest | DataMapRequest)
PairMsg = (PairStateMsg | PairDone | PairSplit | PairDelete | PairYield | PairBlock
           | PairUnblock | PairSwap | HashRequest | DataMapRequest)

TAGS = frozenset({"lease", "pair_prepare", "pair_state", "pair_done", "pair_split",
                  "pair_delete", "pair_yield", "pair_block", "pair_unblock", "pair_swap",
                  "hash", "data_map"})


class BadMessage(ValueError):
    """A control message that does not match its type."""


M = TypeVar("M", bound=_Msg)
TRANSPORT = frozenset({"id", "_peer"})  # added by the peer link, not part of a message


def decode(header: dict[str, Any]) -> Control:
    """The typed message of a peer frame header (the link's own keys aside)."""
    fields = {k: v for k, v in header.items() if k not in TRANSPORT}
    try:
        msg: Control = msgspec.convert(fields, Control)
        return msg
    except msgspec.ValidationError as e:
        raise BadMessage(f"malformed {header.get('t')!r} message: {e}") from None


def decode_reply(header: dict[str, Any], kind: type[M]) -> M:
    """A reply that carries a message of type `kind` (the link tags replies `resp`)."""
    fields = {k: v for k, v in header.items() if k not in TRANSPORT and k != "t"}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as e:
        raise BadMessage(f"malformed reply ({kind.__name__}): {e}") from None


def encode(msg: Control) -> dict[str, Any]:
    """The header that carries `msg`."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out
