"""The pace of a copy: how long to wait so it moves at most `rate` bytes per second,
leaving the links and disks room for host I/O (DRBD's resync rate, for every copy)."""

from __future__ import annotations


class Pace:
    """Holds a copy to `rate` bytes/s (read live, so `pair set` slows a running copy);
    a changed rate starts a new reckoning instead of paying for the old one's bytes."""

    def __init__(self) -> None:
        self.rate = 0
        self.since = 0.0
        self.sent = 0

    def delay(self, rate: int, sent: int, now: float) -> float:
        if rate != self.rate:
            self.rate, self.since, self.sent = rate, now, sent
        if not rate:
            return 0.0
        return max(0.0, (sent - self.sent) / rate - (now - self.since))
