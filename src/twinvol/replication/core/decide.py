"""What one side of a pair does after losing its partner: a pure state machine.

The rules, in the order they apply:

1. stop granting the partner leases at once, whatever comes next (its copy may stop
   being current from this moment, so it must stop serving when its lease runs out);
2. a secondary (or a copy already blocked) stops serving host I/O at once; the state
   becomes ``suspended``;
3. ask the witness; ``wait`` or no answer means ask again after `retry_every`, never
   writing alone meanwhile; ``block`` means this copy is the stale side;
4. on ``continue``, act alone only once every lease granted to the partner has run out
   (`PeerLease.partner_fenced`): then fork the generation and serve in ``local`` mode.

A copy target being filled never serves; a copy source keeps copying alone once the
partner is fenced. The driver (the asyncio manager, or the simulator) performs the
effects and feeds back verdicts and timers, like aioquic's ``next_timer`` /
``handle_timer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from twinvol.replication.core.lease import PeerLease
from twinvol.replication.core.types import Mode, Role, Verdict

RETRY_EVERY = 0.3  # seconds between questions to a witness that said "wait" or was silent
HINT_SLACK = 0.01  # ask this long after the witness's hint (its clock may run a little slow)
MAX_RETRY = 5.0    # never trust a hint to wait longer than this


@dataclass(frozen=True, slots=True)
class AskWitness:
    """Ask the witness whether this side may write alone; answer with `on_verdict`."""


@dataclass(frozen=True, slots=True)
class SetMode:
    mode: Mode
    reason: str


@dataclass(frozen=True, slots=True)
class Suspend:
    """The pair state becomes ``suspended`` (the copies may differ from now on)."""

    reason: str


@dataclass(frozen=True, slots=True)
class GoAlone:
    """The partner is fenced: serve alone in ``local`` mode. With `fork`, start a new
    data generation (and a secondary becomes the primary)."""

    reason: str
    fork: bool


Effect = AskWitness | SetMode | Suspend | GoAlone


class Phase(Enum):
    ASKING = auto()    # a question to the witness is out
    WAITING = auto()   # ask again at the timer
    FENCING = auto()   # allowed to go alone: waiting for the partner's lease to lapse
    DONE = auto()


class PartnerLoss:
    """One decision for one pair, from the loss of the partner to its outcome."""

    def __init__(self, lease: PeerLease, role: Role, mode: Mode, *, copying: bool = False,
                 copy_source: bool = False, retry_every: float = RETRY_EVERY) -> None:
        self.lease = lease
        self.role = role
        self.mode = mode
        self.copying = copying
        self.copy_source = copy_source
        self.retry_every = retry_every
        self.phase = Phase.WAITING
        self.reason = ""
        self._timer: float | None = None
        self._fork = True

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def asking(self) -> bool:
        return self.phase is Phase.ASKING

    def start(self, now: float, reason: str) -> list[Effect]:
        self.reason = reason
        self.lease.revoke()  # rule 1
        if self.copying:
            if self.copy_source:
                self._fork = False
                return self._fence(now)
            self.phase = Phase.DONE
            return [SetMode(Mode.BLOCK, reason)]
        out: list[Effect] = []
        if self.role is Role.SECONDARY or self.mode is Mode.BLOCK:
            out.append(SetMode(Mode.BLOCK, reason))
        out.append(Suspend(reason))
        self.phase = Phase.ASKING
        out.append(AskWitness())
        return out

    def on_verdict(self, verdict: Verdict, now: float, why: str = "",
                   retry_after: float = 0.0) -> list[Effect]:
        """`retry_after`: the witness's hint of when to ask again after ``wait``."""
        if self.phase is not Phase.ASKING:
            return []
        if verdict is Verdict.CONTINUE:
            return self._fence(now)
        if verdict is Verdict.BLOCK:
            self.phase = Phase.DONE
            return [SetMode(Mode.BLOCK, "the partner continues: this copy is stale")]
        return self._retry(now, why, retry_after)

    def on_witness_error(self, now: float, error: str) -> list[Effect]:
        """The witness did not answer: never write alone; ask again later."""
        if self.phase is not Phase.ASKING:
            return []
        return self._retry(now, f"witness unreachable: {error}")

    def next_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> list[Effect]:
        if self._timer is None or now < self._timer:
            return []
        self._timer = None
        if self.phase is Phase.WAITING:
            self.phase = Phase.ASKING
            return [AskWitness()]
        if self.phase is Phase.FENCING:
            return self._fence(now)
        return []

    def _retry(self, now: float, why: str, retry_after: float = 0.0) -> list[Effect]:
        if why:
            self.reason = why
        self.phase = Phase.WAITING
        wait = retry_after + HINT_SLACK if retry_after > 0 else self.retry_every
        self._timer = now + min(wait, MAX_RETRY)
        return []

    def _fence(self, now: float) -> list[Effect]:
        """Rule 4: go alone only once the partner's lease has lapsed."""
        if not self.lease.partner_fenced(now):
            self.phase = Phase.FENCING
            self._timer = self.lease.granted_until
            return []
        self.phase = Phase.DONE
        self._timer = None
        return [GoAlone(self.reason, fork=self._fork)]
