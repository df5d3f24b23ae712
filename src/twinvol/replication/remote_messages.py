"""Typed messages of remote copy (feeder, standby, far target) and their replies.

Like the pair's control messages (`messages`), each travels as a peer frame header
tagged by `t`, and `decode` checks it field by field: a malformed or unknown message
is refused with a clear error instead of failing inside a handler. A batch of records
(`Records`) carries the encoded journal records as its payload.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from twinvol.replication.core.types import GroupState
from twinvol.replication.messages import TRANSPORT, BadMessage, Name, VolumeIdentity
from twinvol.replication.runtime import GroupRecord

Seq = Annotated[int, msgspec.Meta(ge=0)]


class _RMsg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    group: Name


class Records(_RMsg, tag="jr"):
    """Records `first`..`last` of the feeder's journal (the payload). `committed`: every
    write up to it is on both active-active copies; `written`/`wtime`: the feeder's last
    number and its time (the target's lag)."""

    first: Seq
    last: Seq
    committed: int = -1
    written: Seq = 0
    wtime: float = 0.0
    at: float = 0.0     # when the feeder sent it (its wall clock)


class StatRequest(_RMsg, tag="jstat"):
    """What did the target receive and apply, is it still fed by the sender? The feeder
    also says how far it has written (a takeover's count of lost writes), also while it
    ships no records (catching up by chunks)."""

    committed: int = -1
    written: Seq = 0
    wtime: float = 0.0
    at: float = 0.0     # when the feeder sent it (its wall clock)


class Progress(_RMsg, tag="jprog"):
    """The feeder tells the standby how far the far copy is (it trims its journal)."""

    written: Seq
    wtime: float
    received: Seq
    applied: Seq
    atime: float
    state: GroupState
    at: float = 0.0     # when the feeder sent it (its wall clock)


class TargetPrepare(VolumeIdentity, tag="a_prepare"):
    """The primary creates an async pair: the far site takes the volume's identity."""

    group: Name
    journal_limit: Annotated[int, msgspec.Meta(gt=0)]
    mode: str = "async"


class StandbyPrepare(_RMsg, tag="a_standby"):
    """The primary's active-active partner keeps records under the same numbers."""

    pair: Name
    volume: Name
    target: Name
    target_volume: Name
    journal_limit: Annotated[int, msgspec.Meta(gt=0)]
    gen: str
    written: Seq = 0


class NewFeeder(_RMsg, tag="jfeeder"):
    """DR takeover at the standby: the sender feeds the target from now on."""


class Failback(_RMsg, tag="a_failback"):
    """The original primary asks the far copy to send back what differs (the payload:
    the chunks it changed after the recovery point, as a bitmap)."""

    pair: Name


class FailbackDone(_RMsg, tag="a_failback_done"):
    """The far copy's data is back at the original primary: records flow from it again."""

    received: Seq = 0


class Resume(_RMsg, tag="jresume"):
    """A catch-up by chunks is complete: records resume after `seq`."""

    seq: Seq
    time: float
    committed: int = -1
    at: float = 0.0     # when the feeder sent it (its wall clock)


class BitsRequest(_RMsg, tag="jbits"):
    """A standby taking over asks which chunks a catch-up brought to the target."""

    pair: Name


RemoteMsg = (Records | StatRequest | Progress | TargetPrepare | StandbyPrepare | NewFeeder
             | Failback | FailbackDone | Resume | BitsRequest)
Fed = Records | StatRequest | Progress | Resume   # from the feeder: it is alive


# ---- replies (not tagged; unknown fields ignored so a newer peer can add some) ----------

class Stat(msgspec.Struct):
    """The target's numbers: what it received, applied (its recovery point) and who
    feeds it."""

    received: Seq
    applied: Seq
    applied_time: float
    state: GroupState
    feeder: str
    written: Seq = 0


class FailbackReply(msgspec.Struct):
    changed: Seq        # chunks the far copy changed since its takeover
    chunks: Seq         # chunks it sends back in all


class FailbackDoneReply(msgspec.Struct):
    seq: Seq            # records resume after this number
    time: float


class BitsReply(msgspec.Struct):
    chunks: Seq         # set bits in the payload


def stat_reply(rec: GroupRecord) -> tuple[dict[str, Any], bytes]:
    """The target's answer to the feeder's messages: its numbers and its feeder."""
    return encode(Stat(received=rec.received, applied=rec.applied,
                       applied_time=rec.applied_time, state=rec.state, feeder=rec.feeder,
                       written=rec.written)), b""


def decode(header: dict[str, Any]) -> RemoteMsg:
    """The typed message of a peer frame header (the link's own keys aside)."""
    fields = {k: v for k, v in header.items() if k not in TRANSPORT}
    try:
        msg: RemoteMsg = msgspec.convert(fields, RemoteMsg)
        return msg
    except msgspec.ValidationError as e:
        raise BadMessage(f"malformed {header.get('t')!r} message: {e}") from None


R = TypeVar("R", bound=msgspec.Struct)


def reply(header: dict[str, Any], kind: type[R]) -> R:
    """The typed reply in a frame header."""
    fields = {k: v for k, v in header.items() if k not in TRANSPORT and k != "t"}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as e:
        raise BadMessage(f"malformed reply ({kind.__name__}): {e}") from None


def encode(msg: RemoteMsg | msgspec.Struct) -> dict[str, Any]:
    """The header (or reply header) that carries `msg`."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out
