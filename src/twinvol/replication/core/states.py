"""The pair state machine as one table: which state may follow which (the design's
SMPL, COPY, PAIR, PSUS, PSUE, SSWS). Every change of a pair's state goes through
`check`, so a transition the design does not have is a bug that stops the change
instead of a state an operator cannot explain (DRBD's `is_valid_state` is the model).

Self-transitions are allowed (the reason changes). An active-active resync runs while
the pair says `suspended` or `split` and ends `mirrored`; `copying` is the initial
copy, a far copy's catch-up and a failback.
"""

from __future__ import annotations

from collections.abc import Mapping

from twinvol.replication.core.types import PairState

S = PairState

TRANSITIONS: Mapping[PairState, frozenset[PairState]] = {
    # a pair record is born copying; nothing goes back to simplex (the record is deleted)
    S.SIMPLEX: frozenset({S.COPYING}),
    # the copy ends, the partner is lost, or (forced) the far copy is taken over
    S.COPYING: frozenset({S.COPYING, S.MIRRORED, S.SUSPENDED, S.TAKEOVER}),
    # the operator splits, the partner is lost, a far copy catches up, or takes over
    S.MIRRORED: frozenset({S.MIRRORED, S.SPLIT, S.SUSPENDED, S.COPYING, S.TAKEOVER}),
    # resynced (back to mirrored), or the partner asks to be resynced from this copy
    S.SPLIT: frozenset({S.SPLIT, S.MIRRORED, S.SUSPENDED, S.COPYING}),
    # the partner is back (resync), or the far copy serves after losing its sources
    S.SUSPENDED: frozenset({S.SUSPENDED, S.COPYING, S.MIRRORED, S.TAKEOVER}),
    # a far copy that serves hosts: failback copies back, then it is a far copy again;
    # a damaged receive journal found at restart suspends it
    S.TAKEOVER: frozenset({S.TAKEOVER, S.COPYING, S.MIRRORED, S.SUSPENDED}),
}


class InvalidTransition(Exception):
    """A change of pair state the state machine does not have (a bug, refused)."""


def check(pair: str, old: PairState, new: PairState) -> None:
    """Refuse a change of `pair`'s state from `old` to `new` that the table lacks."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"pair {pair}: {old} -> {new} is not a transition of the "
                                "pair state machine")
