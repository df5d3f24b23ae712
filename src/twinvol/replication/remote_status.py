"""What a node can truthfully say about a consistency group it takes part in: state and
reason, the sequence numbers, the lag (records, seconds, bytes) and the journal's fill.

The feeder knows the lag first hand. The target and the standby only know what the
feeder last told them, so their view says how long ago that was and calls itself stale
when the feeder has been silent for longer than it ever is while shipping.
"""

from __future__ import annotations

from typing import Any

from twinvol.replication.bitmap import CHUNK
from twinvol.replication.runtime import GroupRuntime

STALE_AFTER = 5.0   # seconds of feeder silence after which a target's view is stale


def lag_bytes(g: GroupRuntime) -> int:
    """Bytes the target lacks: unapplied journal records, or (catching up from dirty
    chunks) the dirty chunks themselves."""
    if g.rec.mode == "bitmap":
        return sum(pr.dirty.count() for pr in g.pairs.values()) * CHUNK
    j = g.journal
    if not j.last or g.rec.applied >= j.last:
        return 0
    total = 0
    for seq in range(max(g.rec.applied + 1, j.first), j.last + 1):
        where = j.index.get(seq)
        if where is not None:
            total += where[2]
    return total


def lag_seconds(g: GroupRuntime, wall: float) -> float:
    """How long the oldest write the far copy lacks has been waiting (what a loss of this
    site now would cost); without its record here, the gap between the newest written and
    the newest applied write."""
    rec = g.rec
    if rec.written <= rec.applied:
        return 0.0
    oldest = g.journal.record_time(rec.applied + 1)
    if oldest is not None:
        return max(0.0, wall - oldest)
    return max(0.0, rec.written_time - rec.applied_time) if rec.applied_time else 0.0


def group_view(g: GroupRuntime, node: str, wall: float, now: float) -> dict[str, Any]:
    rec = g.rec
    taken_over = rec.state == "takeover" and rec.role == "secondary"
    out: dict[str, Any] = {
        "group": rec.name,
        # A far copy that was taken over serves hosts: it is the primary of what it serves.
        "group_role": "primary" if taken_over else rec.role,
        "feeder": rec.feeder, "target": rec.target,
        "group_state": rec.state, "reason": rec.reason, "journal_mode": rec.mode,
        "sync": rec.sync,
        "sequence": {"written": rec.written, "sent": rec.sent, "received": rec.received,
                     "applied": rec.applied, "committed": g.committed()
                     if rec.role == "primary" else rec.written},
        "recovery_point": {"applied_time": rec.applied_time,
                           "written_time": rec.written_time},
        "lag": {"sequences": max(0, rec.written - rec.applied),
                "seconds": round(lag_seconds(g, wall), 3), "bytes": lag_bytes(g)},
        "journal": {"bytes": g.journal.size, "limit": g.journal.limit,
                    "fill": round(g.journal.size / g.journal.limit, 4)
                    if g.journal.limit else 0.0,
                    "first": g.journal.first, "last": g.journal.last,
                    "damaged_at": g.journal.corrupt_at},
        "shipped": {"bytes": rec.bytes_shipped, "records": rec.records_shipped},
    }
    if rec.feeder != node and not taken_over and rec.state != "suspended":
        heard = round(now - g.last_heard, 1) if g.last_heard else None
        out["feeder_heard_seconds_ago"] = heard
        if heard is None or heard > STALE_AFTER:
            out["stale"] = True
            since = "since this node started" if heard is None else f"for {heard:.0f} s"
            out["reason"] = (f"no word from the feeder {rec.feeder} {since}: these numbers "
                             "may be old")
    if taken_over:
        out["served_at"] = node
    if rec.bitmap_until:
        out["bitmap_until"] = rec.bitmap_until
    if rec.role != "secondary":
        # chunks this node would send the far copy by blocks (what no record covers)
        out["dirty_chunks"] = sum(pr.dirty.count() for pr in g.pairs.values())
    if g.delta:
        out["delta_resync"] = g.delta
    return out
