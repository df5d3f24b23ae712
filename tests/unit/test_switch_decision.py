"""The switch decision (pure): which partner a target identification names, and when a
partner's pair state makes switching the host to it unsafe."""

from __future__ import annotations

import pytest

from twinvol.node.switching import Partner, choose_target
from twinvol.storage.volumes import VolumeError

SNAP = Partner("A", "vol2", "f00d", "snap", "local", "split")
TWIN = Partner("B", "vol", "", "vol", "active-active", "mirrored")
FAR = Partner("C", "vol", "", "vol-dr", "async", "mirrored")


def refused(partners: list[Partner], target: str, nodes: list[str] | None = None) -> str:
    with pytest.raises(VolumeError) as e:
        choose_target("A:vol", partners, target, nodes or ["A", "B"])
    return str(e.value)


@pytest.mark.parametrize("target", ["A:vol2", "vol2", "f00d", " A:vol2 "])
def test_identifications_of_a_local_copy(target: str) -> None:
    assert choose_target("A:vol", [SNAP, TWIN], target, ["A"]) is SNAP


def test_active_active_partner_by_node_and_volume() -> None:
    assert choose_target("A:vol", [SNAP, TWIN], "B:vol", ["A", "B"]) is TWIN


def test_not_a_partner_lists_the_partners() -> None:
    assert refused([SNAP, TWIN], "A:other") == (
        "A:other is not a pair partner of A:vol (its partners: A:vol2 (local pair snap), "
        "B:vol (active-active pair vol))")
    assert "its partners: none" in refused([], "A:vol2")


def test_ambiguous_and_self_and_empty() -> None:
    assert "names several partners" in refused([TWIN, FAR], "vol")
    assert refused([SNAP], "A:vol") == "A:vol is the source volume itself; nothing to switch"
    assert "empty" in refused([SNAP], "  ")


@pytest.mark.parametrize(("partner", "message"), [
    (Partner("A", "vol2", "", "snap", "local", "copying"),
     "local pair 'snap' is copying: A:vol2 is not a consistent copy"),
    (Partner("A", "vol2", "", "snap", "local", "suspended"),
     "local pair 'snap' is suspended: A:vol2 may be incomplete"),
    (Partner("B", "vol", "", "vol", "active-active", "copying"),
     "active-active pair 'vol' is copying: B:vol may be stale"),
    (Partner("B", "vol", "", "vol", "active-active", "mirrored", link_up=False),
     "active-active pair 'vol' is mirrored with its peer link down"),
    (FAR, "async pair 'vol-dr' is mirrored: the far copy C:vol serves no host before"),
])
def test_unsafe_states_are_refused(partner: Partner, message: str) -> None:
    msg = refused([partner], f"{partner.node}:{partner.volume}")
    assert message in msg, msg


def test_target_node_must_serve_the_host() -> None:
    took_over = Partner("C", "vol", "", "vol-dr", "async", "takeover")
    assert choose_target("A:vol", [took_over], "C:vol", ["A", "C"]) is took_over
    assert refused([took_over], "C:vol", ["A", "B"]) == (
        "node C does not serve this host (its nodes: A, B); it cannot take the host's I/O")
    # A copy on the source's own node is always reachable by the host's connections there.
    assert choose_target("A:vol", [SNAP], "A:vol2", ["B"]) is SNAP
