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
