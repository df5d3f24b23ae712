"""The ordering rules of a far copy (async remote copy), as pure decisions shared by the
node (`replication/remote_*.py`, `dr.py`) and the simulator (`twinvol.testing.far`).

The feeder numbers every write; the standby (the feeder's active-active partner) keeps
the same records under the same numbers, so that a DR takeover there feeds the far copy
only what it lacks. Its numbering must never reuse a number the far copy may hold, and
whatever it holds no record for is tracked by dirty chunks instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

BITS_NEEDED = 1 << 62   # dirty chunks stand for writes no record holds (numbers unknown)


class StandbyStep(Enum):
    """What the standby does with a write it applies as the active-active primary or
    alone (one the feeder did not number for it)."""

    NUMBER = auto()     # alone, journaling, with a known count: number it seq_seen + 1
    TO_BLOCKS = auto()  # journaling, but the feeder numbers it without telling: switch
    MARK = auto()       # already tracking by dirty chunks: mark it


def standby_write(alone: bool, journaling: bool, seq_seen: int, readable: bool = True
                  ) -> StandbyStep:
    """A standby numbers its own writes only while alone and only from a count it saw
    (a standby just demoted, seq_seen 0, could reuse numbers the far copy holds). Any
    other write is marked in dirty chunks, standing until the far copy has applied
    every number the feeder gave out (`BITS_NEEDED` until known). `readable`: the
    journal has no damaged record (a damaged one cannot be continued)."""
    if alone and journaling and readable and seq_seen:
        return StandbyStep.NUMBER
    if journaling:
        return StandbyStep.TO_BLOCKS
    return StandbyStep.MARK


def standby_keeps(journaling: bool, seq_seen: int, seq: int) -> bool:
    """A mirrored write with the feeder's number `seq` extends the standby's journal
    only in order (the first one, or the next); anything else is a gap: dirty chunks."""
    return journaling and seq > 0 and (seq_seen == 0 or seq == seq_seen + 1)


def standby_caught_up(mirrored: bool, applied: int, bitmap_until: int) -> bool:
    """The far copy is consistent and holds every write the standby's dirty chunks
    stand for: they can be cleared (and its journal resume)."""
    return mirrored and applied >= bitmap_until


def after_copy_chunk(seq_seen: int, bitmap_until: int, written: int, j: int
                     ) -> tuple[int, int]:
    """A resync chunk reached the standby reflecting the feeder's writes up to `j`:
    numbers up to `j` are taken (never reuse them) and its chunk stands for them.
    Returns the new (seq_seen, bitmap_until)."""
    return max(seq_seen, j), max(bitmap_until, j, written)


@dataclass(frozen=True, slots=True)
class TakeoverPlan:
    """How a standby taking over feeds the far copy from its `received` point."""

    journal: bool     # its journal holds every record the far copy lacks: ship those
    reason: str       # why not, when it must send dirty chunks instead


def takeover_plan(journaling: bool, seq_seen: int, received: int, holds_gap: bool,
                  dirty: int, bitmap_until: int, far_mirrored: bool,
                  far_chunked: int) -> TakeoverPlan:
    """`holds_gap`: the journal holds every number from `received` + 1 to `seq_seen`;
    `dirty`: chunks this copy tracks for the far copy; `far_chunked`: chunks a catch-up
    brought the far copy whose writes the lost feeder may not have seen committed (they
    may hold writes this node never had: they must go again)."""
    if not journaling:
        return TakeoverPlan(False, "this copy tracks dirty chunks, not records")
    if seq_seen > received and not holds_gap:
        return TakeoverPlan(False, f"the journal lacks records after {received}")
    if far_chunked:
        return TakeoverPlan(False, f"the far copy holds {far_chunked} chunk(s) of a "
                                   "catch-up this copy may lack")
    if dirty and not (bitmap_until <= received and far_mirrored):
        return TakeoverPlan(False, f"{dirty} dirty chunk(s) stand for writes no record holds")
    return TakeoverPlan(True, "")


def chunk_bits_close(far_mirrored: bool, committed: int, bits_until: int) -> bool:
    """At the far copy: the chunk bits of a catch-up stand until the feeder says every
    write they may hold (up to `bits_until`) is on both active-active copies."""
    return far_mirrored and committed >= bits_until


def standby_bound(bitmap_until: int, aa_mirrored: bool, aa_inflight: int, aa_dirty: int,
                  feeder_written: int) -> int:
    """The standby's dirty chunks for writes it made as the active-active primary stand
    for numbers only the feeder knows (`BITS_NEEDED`). Once every such write has been
    answered by the feeder (none in flight), none failed (no active-active dirty chunk:
    a failed one goes to the feeder by the pair's resync, then to the far copy by its
    catch-up) and the pair is mirrored, the feeder's `written` in a progress report
    read now covers them all: the feeder numbers a write before answering it, and the
    report follows the answer on the same link. Returns the new bound."""
    if bitmap_until == BITS_NEEDED and aa_mirrored and not aa_inflight and not aa_dirty:
        return feeder_written
    return bitmap_until
