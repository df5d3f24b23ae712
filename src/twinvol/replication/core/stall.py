"""Is a far copy still advancing? The feeder asks this of every group it feeds, so a copy
that stopped says so (a reason, a fault report, a catch-up by chunks) instead of reading
`mirrored` while its lag grows.

Two ways to stop: the target applies nothing although records wait and the link is up
(a lost reply, a shipping loop that died, a target that takes nothing), or a write keeps
its sequence number in flight for ever, so nothing after it may be shipped. Writes and
applies normally complete in milliseconds; a partner loss can hold a write for the
witness decision and the host's I/O timeout, so the thresholds are tens of seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

APPLY_STALL_AFTER = 10.0      # seconds without an applied record while records wait
INFLIGHT_STALL_AFTER = 20.0   # seconds one sequence number may stay uncommitted


@dataclass(frozen=True)
class Stalled:
    """The copy stopped; `reason` is what the operator reads."""

    reason: str


class CopyProgress:
    """Watches the sequence numbers of one group at its feeder (`observe` each tick)."""

    def __init__(self, apply_after: float = APPLY_STALL_AFTER,
                 inflight_after: float = INFLIGHT_STALL_AFTER) -> None:
        self.apply_after = apply_after
        self.inflight_after = inflight_after
        self.applied = -1
        self.applied_since = 0.0
        self.oldest = 0
        self.oldest_since = 0.0

    def reset(self, now: float) -> None:
        """Start watching afresh (after a catch-up, a link coming up, a restart)."""
        self.applied = -1
        self.oldest = 0
        self.applied_since = self.oldest_since = now

    def observe(self, now: float, *, written: int, committed: int, sent: int, applied: int,
                oldest_inflight: int, target_up: bool, streaming: bool) -> Stalled | None:
        """`committed`: the last sequence number that may be shipped; `streaming`: the
        group ships records (journal mode). Returns a Stalled once per stop; the
        caller's recovery resets the watch."""
        if oldest_inflight != self.oldest:
            self.oldest, self.oldest_since = oldest_inflight, now
        elif oldest_inflight and now - self.oldest_since > self.inflight_after:
            return Stalled(f"write {oldest_inflight} stayed uncommitted for "
                           f"{now - self.oldest_since:.0f} s: nothing after it could be "
                           f"shipped (written {written}, sent {sent}, applied {applied})")
        if applied != self.applied or not streaming or not target_up or committed <= applied:
            self.applied, self.applied_since = applied, now
            return None
        if now - self.applied_since > self.apply_after:
            return Stalled(f"the target applied nothing for {now - self.applied_since:.0f} s "
                           f"with the link up (written {written}, sent {sent}, "
                           f"applied {applied})")
        return None
