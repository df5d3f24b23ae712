"""The pair state machine's table: the transitions the design has are allowed, the
ones it lacks are refused as bugs, and every state has a row."""

from __future__ import annotations

import pytest

from twinvol.replication.core import states
from twinvol.replication.core.types import PairState as S


def test_every_state_has_a_row_and_may_keep_its_state_but_simplex() -> None:
    assert set(states.TRANSITIONS) == set(S)
    for s in S:
        assert (s in states.TRANSITIONS[s]) == (s is not S.SIMPLEX)
    assert all(S.SIMPLEX not in nxt for nxt in states.TRANSITIONS.values())


@pytest.mark.parametrize(("old", "new"), [
    (S.COPYING, S.MIRRORED), (S.MIRRORED, S.SPLIT), (S.MIRRORED, S.SUSPENDED),
    (S.SPLIT, S.MIRRORED), (S.SUSPENDED, S.MIRRORED), (S.MIRRORED, S.TAKEOVER),
    (S.TAKEOVER, S.COPYING), (S.TAKEOVER, S.MIRRORED), (S.MIRRORED, S.COPYING),
])
def test_the_designs_transitions_pass(old: S, new: S) -> None:
    states.check("p", old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.MIRRORED, S.SIMPLEX), (S.COPYING, S.SPLIT), (S.SUSPENDED, S.SPLIT),
    (S.SPLIT, S.TAKEOVER), (S.TAKEOVER, S.SPLIT), (S.SIMPLEX, S.MIRRORED),
])
def test_the_others_are_refused_naming_the_pair(old: S, new: S) -> None:
    with pytest.raises(states.InvalidTransition,
                       match=f"pair p: {old} -> {new} is not a transition"):
        states.check("p", old, new)
