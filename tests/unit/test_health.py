"""The verdict of `twinvol status` (pure): what makes the cluster degraded or down."""

from __future__ import annotations

from typing import Any

from twinvol.health import FAULT_WINDOW, Seen, Verdict, judge, open_faults

UP = {"site": "A", "pid": 1}


def side(role: str, state: str, io_mode: str, partner: str, **kw: Any) -> dict[str, Any]:
    return {"role": role, "state": state, "io_mode": io_mode, "partner": partner,
            "mode": "active-active", "copy": {"running": False}, **kw}


def test_healthy_degraded_down() -> None:
    mirrored = {"p": {"A": side("primary", "mirrored", "mirror", "B"),
                      "B": side("secondary", "mirrored", "mirror", "A")}}
    j = judge(Seen(nodes={"A": UP, "B": UP}, pairs=mirrored))
    assert (j.verdict, j.verdict.exit_code, j.reasons) == (Verdict.HEALTHY, 0, [])

    lost_b = {"p": {"A": side("primary", "suspended", "local", "B")}}
    j = judge(Seen(nodes={"A": UP, "B": {"error": "x"}}, pairs=lost_b))
    assert j.verdict is Verdict.DEGRADED and j.verdict.exit_code == 1
    assert j.reasons == ["node B is down", "pair p is suspended", "pair p has lost its side on B"]

    blocked = {"p": {"B": side("secondary", "suspended", "block", "A")}}
    j = judge(Seen(nodes={"A": {"error": "x"}, "B": UP}, pairs=blocked))
    assert j.verdict is Verdict.DOWN and j.verdict.exit_code == 2
    assert j.reasons[0] == "pair p: no side serves host I/O (suspended)"
    assert judge(Seen(nodes={"A": {"error": "x"}}, pairs={})).reasons == [
        "no node answers", "node A is down"]


def test_copy_progress_and_components() -> None:
    copying = {"p": {"A": side("primary", "copying", "local", "B",
                               copy={"running": True, "total_chunks": 8,
                                     "remaining_chunks": 2})}}
    j = judge(Seen(nodes={"A": UP, "B": UP}, pairs=copying, witness={"error": "w"},
                   host={"exports": {"p": {"paths": {"A": {"state": "up"},
                                                     "B": {"state": "blocked"}}}}}))
    assert j.pairs["p"]["progress"] == 75.0
    assert j.reasons == ["pair p is copying, copy 75.0% done", "the witness does not answer",
                         "host path p via B is blocked"]


def test_open_faults_are_the_latest_raised_and_recent() -> None:
    def r(t: float, kind: str, state: str, severity: str = "error") -> dict[str, Any]:
        return {"origin": "A", "component": "pair", "kind": kind, "subject": "p",
                "time": t, "state": state, "severity": severity}

    now = 10_000.0
    reports = [r(1, "pair_suspended", "raised"), r(2, "pair_suspended", "cleared", "info"),
               r(now - 5, "peer_link_down", "raised"),
               r(now - FAULT_WINDOW - 1, "slow_io", "raised", "warning"),
               r(now - 1, "pair_state", "raised", "info")]
    assert [f["kind"] for f in open_faults(reports, now)] == ["peer_link_down"]
    j = judge(Seen(nodes={"A": UP}, pairs={}, faults=reports, now=now))
    assert j.reasons == ["open error fault on A: peer_link_down p"]
