"""The pair vocabulary as types: roles, I/O modes, pair states and witness verdicts.

They are `StrEnum`s so the values stored in pair records and shown by the API stay the
strings the design names (a `Mode.MIRROR` equals ``"mirror"``).
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    STANDBY = "standby"   # remote copy: the active-active partner that can feed the far copy


class Mode(StrEnum):
    """What a copy does with host I/O."""

    MIRROR = "mirror"   # serve under the partner's lease; every write lands on both
    LOCAL = "local"     # serve alone (the partner is fenced or gone)
    BLOCK = "block"     # serve nothing: this copy may be stale


class PairState(StrEnum):
    """The design's pair states (SMPL, COPY, PAIR, PSUS, PSUE, SSWS)."""

    SIMPLEX = "simplex"
    COPYING = "copying"
    MIRRORED = "mirrored"
    SPLIT = "split"
    SUSPENDED = "suspended"
    TAKEOVER = "takeover"


class Verdict(StrEnum):
    """The witness's answer to "may I write alone?"."""

    CONTINUE = "continue"
    BLOCK = "block"
    WAIT = "wait"


class GroupRole(StrEnum):
    """A node's part in a consistency group of remote copies."""

    PRIMARY = "primary"       # feeds the far copy (numbers the writes)
    STANDBY = "standby"       # the primary's active-active partner: keeps the records too
    SECONDARY = "secondary"   # the far copy


class GroupState(StrEnum):
    """A consistency group's state (the far copy's view of it)."""

    COPYING = "copying"       # initial copy or catch-up by chunks: not consistent yet
    MIRRORED = "mirrored"     # records flow in write order: a consistent prefix
    SUSPENDED = "suspended"   # stopped (the reason says why); nothing ships
    TAKEOVER = "takeover"     # the far copy serves hosts (DR takeover)


class JournalMode(StrEnum):
    JOURNAL = "journal"       # every write since the target's point is in the journal
    BITMAP = "bitmap"         # records are missing: dirty chunks stand for them
