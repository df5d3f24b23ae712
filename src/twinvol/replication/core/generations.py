"""Which way data flows when the two copies of a pair meet: data generations compared,
with the rule that decided (as DRBD's `uuid_compare` reports its rule numbers).

Both copies share `current` while mirrored; a copy that starts writing without its
partner pushes its `current` onto its history and takes a new one. So:

1. equal current generations: the same data, only chunks touched around a crash may
   differ: the primary (the side that orders writes) sends them;
2. the partner's current is in this copy's history: this copy wrote on after the
   partner stopped: it is newer, it sends;
3. this copy's current is in the partner's history: the partner is newer;
4. neither, but the histories share a generation: both wrote alone after it (split
   brain): nothing is copied until an operator chooses;
5. nothing in common: unrelated data (never the same pair, or history lost): as 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Direction(StrEnum):
    NONE = "none"              # the same generation
    TO_PEER = "to_peer"        # this copy is the resync source
    FROM_PEER = "from_peer"    # the partner is
    SPLIT_BRAIN = "split_brain"


class Rule(IntEnum):
    SAME = 1
    PEER_IN_MY_HISTORY = 2
    MINE_IN_PEER_HISTORY = 3
    SPLIT_BRAIN = 4
    UNRELATED = 5


@dataclass(frozen=True, slots=True)
class Comparison:
    direction: Direction
    rule: Rule
    why: str

    @property
    def diverged(self) -> bool:
        return self.direction is Direction.SPLIT_BRAIN


def compare(mine: str, mine_history: Sequence[str], peer: str,
            peer_history: Sequence[str]) -> Comparison:
    """Compare this copy's generations with the partner's."""
    if mine == peer:
        return Comparison(Direction.NONE, Rule.SAME, f"both at generation {mine}")
    if peer in mine_history:
        return Comparison(Direction.TO_PEER, Rule.PEER_IN_MY_HISTORY,
                          f"this copy wrote on after generation {peer} (now {mine})")
    if mine in peer_history:
        return Comparison(Direction.FROM_PEER, Rule.MINE_IN_PEER_HISTORY,
                          f"the partner wrote on after generation {mine} (now {peer})")
    common = [g for g in mine_history if g in set(peer_history)]
    if common:
        return Comparison(Direction.SPLIT_BRAIN, Rule.SPLIT_BRAIN,
                          f"both copies were written alone after generation {common[0]} "
                          f"(this copy {mine}, the partner {peer})")
    return Comparison(Direction.SPLIT_BRAIN, Rule.UNRELATED,
                      f"the copies share no generation (this copy {mine}, the partner "
                      f"{peer}): unrelated data")


class Meeting(StrEnum):
    """What this copy does when it meets its partner."""

    SEND = "send"        # the resync source: take the partner's dirty bits, copy to it
    RECEIVE = "receive"  # the partner copies here; stay blocked until it is done
    STOP = "stop"        # split brain: block, suspend, wait for the operator


def meeting(cmp: Comparison, primary: bool, rebooted: bool = False,
            partner_rebooted: bool = False) -> Meeting:
    """The side that sends when the copies meet. With one data generation, only chunks
    touched around a crash can differ: the side whose machine did not restart sends
    them (the other may have lost or torn writes both had acknowledged, which were
    still in its page cache); otherwise the primary."""
    if cmp.diverged:
        return Meeting.STOP
    if cmp.direction is Direction.NONE and rebooted != partner_rebooted:
        return Meeting.RECEIVE if rebooted else Meeting.SEND
    if cmp.direction is Direction.TO_PEER or (cmp.direction is Direction.NONE and primary):
        return Meeting.SEND
    return Meeting.RECEIVE
