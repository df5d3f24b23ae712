"""The generation rules that decide which copy is the resync source when a pair's two
copies meet, each with its rule number; and that the decision is symmetric: whatever
the histories, the two sides never both send, and never both receive unless stopped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twinvol.replication.core.generations import (
    Direction,
    Meeting,
    Rule,
    compare,
    meeting,
)


def test_each_rule_with_its_number_and_reason() -> None:
    same = compare("g1", ["g0"], "g1", ["g0"])
    assert (same.direction, same.rule) == (Direction.NONE, Rule.SAME)
    newer = compare("g2", ["g1", "g0"], "g1", ["g0"])
    assert (newer.direction, newer.rule) == (Direction.TO_PEER, Rule.PEER_IN_MY_HISTORY)
    assert "wrote on after generation g1" in newer.why
    older = compare("g1", ["g0"], "g3", ["g1", "g0"])
    assert (older.direction, older.rule) == (Direction.FROM_PEER, Rule.MINE_IN_PEER_HISTORY)
    split = compare("g2", ["g1", "g0"], "g3", ["g1", "g0"])
    assert (split.direction, split.rule) == (Direction.SPLIT_BRAIN, Rule.SPLIT_BRAIN)
    assert "after generation g1" in split.why
    alien = compare("a1", ["a0"], "b1", ["b0"])
    assert (alien.rule, alien.diverged) == (Rule.UNRELATED, True)


def test_the_primary_sends_when_generations_are_equal() -> None:
    same = compare("g1", [], "g1", [])
    assert meeting(same, primary=True) is Meeting.SEND
    assert meeting(same, primary=False) is Meeting.RECEIVE
    assert meeting(compare("g2", ["g1"], "g1", []), primary=False) is Meeting.SEND
    assert meeting(compare("g2", ["g0"], "g3", ["g0"]), primary=True) is Meeting.STOP


gens = st.sampled_from(["g0", "g1", "g2", "g3", "g4"])


@given(gens, st.lists(gens, max_size=4), gens, st.lists(gens, max_size=4), st.booleans())
def test_the_two_sides_agree(a: str, ah: list[str], b: str, bh: list[str],
                             a_primary: bool) -> None:
    # Histories as generations produce them: a copy's own current is never in its history.
    ah, bh = [g for g in ah if g != a], [g for g in bh if g != b]
    mine, theirs = compare(a, ah, b, bh), compare(b, bh, a, ah)
    assert mine.diverged == theirs.diverged
    if mine.diverged:
        return
    plans = {meeting(mine, a_primary), meeting(theirs, not a_primary)}
    if not (a in bh and b in ah):   # a cycle cannot arise from forks
        assert plans == {Meeting.SEND, Meeting.RECEIVE}
