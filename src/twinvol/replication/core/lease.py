"""Peer leases: the right of each side of a mirrored pair to serve host I/O.

While a pair is mirrored, both sides serve reads from their own copy. That is only
correct while no write is acknowledged by one side alone, so the right to serve is a
lease the partner grants, and a side never acknowledges alone before the lease it
granted has run out (Raft's leader lease, DRBD's fencing, GAD's quorum rule):

* side X sends a lease request at its monotonic time `s`; the partner Y grants it at
  its own time `g` (after `s` in real time) and promises not to act alone before
  `g + fence_span` by its clock; once X hears the grant, X serves until `s + duration`
  by its clock;
* with clock rates off by at most `drift` (a fraction, both ways) and
  `fence_span = duration * (1 + 2 * drift) + margin`, Y's promise outlasts X's lease
  in real time whenever `margin >= duration * drift * (1 + drift) / (1 - drift)`; the
  defaults (1 s, 1%, 50 ms) meet that with room to spare;
* a grant that arrives late is still safe: X's lease counts from when it *sent* the
  request, so a pause anywhere only shortens it;
* a side that has lost its lease stops answering at once (the I/O gate compares
  `held_until` with the clock when each reply leaves), so requests queued before a
  pause are never answered from a copy that may be stale.

A side that starts, or restarts after a crash, assumes it granted a lease just
before: it may act alone only after `fence_span` (the grant was in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DURATION = 1.0      # seconds a grant lets the requester serve
RENEW_EVERY = 0.1   # how often a serving side asks again
DRIFT = 0.01        # assumed bound on the rate difference of two monotonic clocks
MARGIN = 0.05       # seconds added to every promise


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    duration: float = DURATION
    renew_every: float = RENEW_EVERY
    drift: float = DRIFT
    margin: float = MARGIN

    def __post_init__(self) -> None:
        if not 0 < self.renew_every < self.duration:
            raise ValueError("renew_every must be positive and below the lease duration")
        if not 0 <= self.drift < 0.5:
            raise ValueError("drift must be in [0, 0.5)")
        if self.margin < self.duration * self.drift * (1 + self.drift) / (1 - self.drift):
            raise ValueError("margin too small for the drift: a promise could end before "
                             "the lease it covers")

    @property
    def fence_span(self) -> float:
        """How long a grant binds the granting side, by its own clock."""
        return self.duration * (1 + 2 * self.drift) + self.margin


@dataclass(slots=True)
class PeerLease:
    """One side's lease state for one pair: what it holds and what it promised."""

    config: LeaseConfig
    held_until: float = 0.0       # this side may serve (mirror mode) before this time
    granted_until: float = 0.0    # this side may not act alone before this time
    granting: bool = False        # True while mirrored: the partner may serve too
    _sent: dict[int, float] = field(default_factory=dict)
    _seq: int = 0

    @classmethod
    def after_start(cls, config: LeaseConfig, now: float) -> PeerLease:
        """A side that (re)starts may have granted a lease just before it went down."""
        return cls(config, granted_until=now + config.fence_span)

    # ---- the requesting side ----------------------------------------------

    def request(self, now: float) -> int:
        """A lease request leaves now: returns its sequence number."""
        self._seq += 1
        self._sent[self._seq] = now
        if len(self._sent) > 64:  # answers that never came: forget the oldest
            for old in sorted(self._sent)[:-64]:
                del self._sent[old]
        return self._seq

    def on_reply(self, seq: int, granted: bool) -> bool:
        """The partner answered request `seq`; returns True if the lease grew."""
        sent = self._sent.pop(seq, None)
        for old in [s for s in self._sent if s < seq]:
            del self._sent[old]  # answers come in order: earlier ones are lost
        if sent is None or not granted:
            return False
        until = sent + self.config.duration
        if until <= self.held_until:
            return False
        self.held_until = until
        return True

    def valid(self, now: float) -> bool:
        return now < self.held_until

    def drop(self) -> None:
        """Stop serving under the lease (the partner told us, or we left mirror mode)."""
        self.held_until = 0.0
        self._sent.clear()

    # ---- the granting side --------------------------------------------------

    def grant(self, now: float) -> bool:
        """The partner asks for a lease; grant it unless this side stopped granting."""
        if not self.granting:
            return False
        self.granted_until = max(self.granted_until, now + self.config.fence_span)
        return True

    def revoke(self) -> float:
        """Stop granting (this side is about to act alone); returns when it may."""
        self.granting = False
        return self.granted_until

    def resume(self) -> None:
        """Mirrored again: grant leases to the partner."""
        self.granting = True

    def partner_fenced(self, now: float) -> bool:
        """True once every lease this side granted has run out."""
        return now >= self.granted_until

    def may_act_alone(self, now: float) -> bool:
        """Not granting, and every lease granted has run out: a write reaching only this
        copy may be acknowledged now."""
        return not self.granting and now >= self.granted_until
