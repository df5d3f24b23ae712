"""The simulated cluster's messages, one typed record each (no string tags).

Peer messages carry the `session` of the peer connection they belong to, so a message
of a connection one side already declared dead is dropped, as a closed socket would.
"""

from __future__ import annotations

from dataclasses import dataclass

from twinvol.replication.core.types import Mode, PairState, Role, Verdict

# ---- peer link --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    session: int


@dataclass(frozen=True, slots=True)
class HelloAck:
    session: int


@dataclass(frozen=True, slots=True)
class Ping:
    session: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The receiver's connection `session` is dead on this side."""

    session: int


@dataclass(frozen=True, slots=True)
class LeaseReq:
    session: int
    seq: int


@dataclass(frozen=True, slots=True)
class LeaseRep:
    session: int
    seq: int
    granted: bool


@dataclass(frozen=True, slots=True)
class Repl:
    """A mirrored write (or a resync copy of a block) from the primary."""

    session: int
    rid: int
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class ReplAck:
    session: int
    rid: int


@dataclass(frozen=True, slots=True)
class Fwd:
    """A host write the secondary received, forwarded to the primary."""

    session: int
    rid: int
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class FwdAck:
    session: int
    rid: int
    ok: bool


@dataclass(frozen=True, slots=True)
class PairStateMsg:
    session: int
    reply: bool
    gen: str
    history: tuple[str, ...]
    role: Role
    state: PairState
    mode: Mode
    dirty: frozenset[int]


@dataclass(frozen=True, slots=True)
class PairDone:
    session: int
    gen: str
    history: tuple[str, ...]
    role: Role
    lease_seq: int


@dataclass(frozen=True, slots=True)
class PairDoneAck:
    session: int
    lease_seq: int
    granted: bool


PeerMsg = (Hello | HelloAck | Ping | Reset | LeaseReq | LeaseRep | Repl | ReplAck | Fwd | FwdAck
           | PairStateMsg | PairDone | PairDoneAck)


# ---- witness ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Arbitrate:
    rid: int
    node: str
    partner: str
    role: Role
    generation: str


@dataclass(frozen=True, slots=True)
class ArbitrateRep:
    rid: int
    verdict: Verdict
    retry_after: float


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: str


@dataclass(frozen=True, slots=True)
class Release:
    node: str


# ---- host I/O ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Read:
    rid: int
    block: int


@dataclass(frozen=True, slots=True)
class Write:
    rid: int
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class IoReply:
    """`ok` False: refused (fenced, blocked) or failed; `value` is what a read saw."""

    rid: int
    ok: bool
    value: int = 0
