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
    seq: int = 0    # the far copy's sequence number of this write (0: none)
    j: int = 0      # (resync block) the last number the sender knows


@dataclass(frozen=True, slots=True)
class Progress:
    """Feeder to standby: how far the far copy is, and whether it is consistent."""

    session: int
    applied: int
    consistent: bool
    written: int = 0    # the feeder's last number (bounds the standby's unnumbered chunks)


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
           | PairStateMsg | PairDone | PairDoneAck | Progress)


# ---- the far site (C) ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Records:
    feeder: str
    recs: tuple[tuple[int, int, int], ...]   # (sequence number, block, value)
    committed: int      # every write up to here is on both active-active copies


@dataclass(frozen=True, slots=True)
class Chunk:
    """A block of a catch-up: the far copy is inconsistent until records resume."""

    feeder: str
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class Resume:
    feeder: str
    seq: int


@dataclass(frozen=True, slots=True)
class FarStatReq:
    feeder: str
    committed: int


@dataclass(frozen=True, slots=True)
class NewFeeder:
    node: str


@dataclass(frozen=True, slots=True)
class FarStat:
    """C's answer to everything: where it is, and who feeds it."""

    applied: int
    consistent: bool
    feeder: str
    chunk: int = -1     # the block of the Chunk answered, else -1
    gap: bool = False   # a record did not follow the last one applied
    chunked: frozenset[int] = frozenset()   # blocks a catch-up brought since consistent


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
