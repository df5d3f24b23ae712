"""Fault reports: model, detectors, relay between nodes, push to host agents, sinks.

Code in the node process raises a fault with `twinvol.faults.report(...)` (for example
the journal: `report("journal", "journal_overflow", "critical", "journal g1 overflowed")`);
publishing an event the detectors know (see `detectors.py`) works as well.
"""

from __future__ import annotations


def report(component: str, kind: str, severity: str, description: str, *, action: str = "",
           subject: str = "") -> None:
    """Raise a fault on this node (see `twinvol.faults.node.report`)."""
    from twinvol.faults.node import report as _report

    _report(component, kind, severity, description, action=action, subject=subject)


__all__ = ["report"]
