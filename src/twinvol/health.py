"""The cluster's health as one verdict an operator can trust and monitoring can alert on.

Pure: `twinvol status` gathers what the nodes, the host agent and the witness say into a
`Seen`; `judge` turns it into healthy / degraded / down with the reasons, and the exit
code 0 / 1 / 2. Down means some data cannot be reached by hosts (no node answers, or a
pair no side serves); degraded means it can, but with less protection than configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

FAULT_WINDOW = 900.0  # a raised fault counts as open this long after its last report
_BAD_PATHS = ("down", "blocked", "mismatch", "absent")
_ALERT = ("error", "critical")


class Verdict(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"

    @property
    def exit_code(self) -> int:
        return {"healthy": 0, "degraded": 1, "down": 2}[self.value]


@dataclass(slots=True)
class Seen:
    """What the cluster said. A node, host agent or witness that did not answer is a dict
    with "error"; `host` and `witness` are None when the cluster file has none."""

    nodes: dict[str, dict[str, Any]]
    pairs: dict[str, dict[str, dict[str, Any]]]  # pair -> node -> that node's view
    host: dict[str, Any] | None = None
    witness: dict[str, Any] | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    now: float = 0.0


@dataclass(slots=True)
class Judgement:
    verdict: Verdict
    reasons: list[str]
    pairs: dict[str, dict[str, Any]]   # pair -> summary (state, sides, progress, lag)
    faults: list[dict[str, Any]]       # the open ones


def pair_summary(name: str, sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One line of a pair: its state as the serving side sees it, copy progress, lag."""
    serving = [n for n, v in sides.items() if v.get("io_mode") not in (None, "block")]
    lead_node = next((n for n in serving if sides[n].get("role") == "primary"),
                     serving[0] if serving else next(iter(sides)))
    lead = sides[lead_node]
    copy = lead.get("copy") or {}
    progress = None
    if copy.get("running") and copy.get("total_chunks"):
        total = int(copy["total_chunks"])
        progress = round(100.0 * (total - int(copy.get("remaining_chunks", 0))) / total, 1)
    rc = lead.get("remote_copy") or {}
    lag = (rc.get("lag") or {}).get("seconds") if rc else None
    nodes = {n for n in sides} | {str(v["partner"]) for v in sides.values() if v.get("partner")}
    return {"name": name, "mode": lead.get("mode", "active-active"), "state": lead.get("state"),
            "primary": lead_node, "io_mode": lead.get("io_mode"), "serving": serving,
            "nodes": sorted(nodes), "seen_by": sorted(sides), "progress": progress,
            "lag_seconds": lag, "reason": lead.get("reason", "")}


def open_faults(reports: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """The faults still standing: per origin, kind and subject the latest report, if it
    is raised (not cleared), a warning or worse, and recent (one-off events age out)."""
    latest: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in sorted(reports, key=lambda r: (r.get("time", 0.0), r.get("seq", 0))):
        latest[(r.get("origin", ""), r.get("component", ""), r.get("kind", ""),
                r.get("subject", ""))] = r
    return [r for r in latest.values() if r.get("state") == "raised"
            and r.get("severity") in ("warning", *_ALERT)
            and now - float(r.get("time", 0.0)) <= FAULT_WINDOW]


def judge(seen: Seen) -> Judgement:
    down: list[str] = []
    degraded: list[str] = []
    up = [n for n, s in seen.nodes.items() if "error" not in s]
    if not up:
        down.append("no node answers")
    degraded += [f"node {n} is down" for n, s in seen.nodes.items() if "error" in s]
    pairs = {name: pair_summary(name, sides) for name, sides in sorted(seen.pairs.items())}
    for p in pairs.values():
        name = p["name"]
        if not p["serving"]:
            down.append(f"pair {name}: no side serves host I/O ({p['state']})")
        elif p["state"] != "mirrored":
            pct = f", copy {p['progress']}% done" if p["progress"] is not None else ""
            degraded.append(f"pair {name} is {p['state']}{pct}")
        missing = [n for n in p["nodes"] if n in seen.nodes and "error" in seen.nodes[n]]
        if missing and p["serving"]:
            degraded.append(f"pair {name} has lost its side on {', '.join(missing)}")
    if seen.witness is not None and "error" in seen.witness:
        degraded.append("the witness does not answer")
    if seen.host is not None:
        if "error" in seen.host:
            degraded.append("the host agent does not answer")
        else:
            for export, ex in sorted((seen.host.get("exports") or {}).items()):
                for node, path in sorted((ex.get("paths") or {}).items()):
                    if path.get("state") in _BAD_PATHS:
                        degraded.append(f"host path {export} via {node} is {path['state']}")
    faults = open_faults(seen.faults, seen.now)
    degraded += [f"open {f['severity']} fault on {f.get('origin')}: {f.get('kind')} "
                 f"{f.get('subject', '')}".rstrip() for f in faults if f["severity"] in _ALERT]
    verdict = Verdict.DOWN if down else Verdict.DEGRADED if degraded else Verdict.HEALTHY
    return Judgement(verdict, down + _unique(degraded), pairs, faults)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
