"""The witness's decision rules as a pure state machine (no I/O; time is passed in as `now`).

A pair whose two sides lose each other must end with at most one side writing. The
`Arbiter` decides which, and the rules are kept deliberately small:

* a grant is sticky: the first node to get ``continue`` for a pair *holds* it, and its
  partner gets ``block`` until the holder releases the pair (after resync). A hold never
  expires by time: if the holder dies, its partner is the stale side;
* nobody holds the pair and the primary asks: the primary gets ``continue`` at once;
* nobody holds the pair and the secondary asks: it gets ``continue`` only once the primary
  has been silent (no heartbeat, arbitrate or release) for `takeover_after` seconds, and
  ``wait`` before that -- so a cut peer link leaves the primary writing, and only a dead
  primary lets the secondary take over.

`now` is a monotonic clock reading. Nodes not heard from since the arbiter was created
count as heard at creation time, so a restarted witness gives a live primary
`takeover_after` seconds to check in before its secondary may take over.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import msgspec

Role = Literal["primary", "secondary"]
Verdict = Literal["continue", "block", "wait"]

DEFAULT_TAKEOVER_AFTER = 1.5  # three heartbeats missed; leases make a spurious takeover safe
HEARTBEAT_INTERVAL = 0.5  # how often nodes heartbeat; well below takeover_after
WAIT_RETRY = 0.3  # how often a node told to ``wait`` asks again (not writing meanwhile)
STATE_FORMAT = "twinvol-witness/1"
MAX_NAME = 256


class RequestError(Exception):
    """A request the witness refuses without changing anything (HTTP 400)."""

    code = "invalid"


class Conflict(RequestError):
    """A well-formed request that contradicts the current holds (HTTP 409)."""

    code = "conflict"


class StateError(Exception):
    """A snapshot that cannot be restored: forgetting a grant silently is not an option."""


class ArbitrateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A node that lost its partner for `pair` asks whether it may keep writing."""

    pair: str
    node: str
    partner: str
    role: Role
    generation: str


class Decision(msgspec.Struct):
    """``continue`` (write alone), ``block`` (stop: the partner holds the pair) or ``wait``
    (ask again in `retry_after` seconds, not writing meanwhile: when the primary's
    silence would reach `takeover_after`, so a takeover is not late by a polling step)."""

    decision: Verdict
    holder: str | None
    reason: str
    retry_after: float = 0.0


class Hold(msgspec.Struct, forbid_unknown_fields=True):
    """Who may write to a broken pair, as granted and persisted."""

    node: str
    partner: str
    role: Role
    generation: str


class State(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    seq: int
    holds: dict[str, Hold]


class Arbiter:
    """Sticky per-pair grants plus node liveness; every method takes `now`.

    `seq` increases whenever the holds change, so a caller knows when to persist.
    """

    def __init__(self, nodes: Iterable[str], now: float,
                 takeover_after: float = DEFAULT_TAKEOVER_AFTER) -> None:
        self.nodes = frozenset(nodes)
        if not self.nodes:
            raise ValueError("the witness needs at least one node")
        if not takeover_after > 0:
            raise ValueError("takeover_after must be positive")
        self.takeover_after = takeover_after
        self.started = now
        self.seq = 0
        self.holds: dict[str, Hold] = {}
        self.last_seen: dict[str, float] = {}

    # ---- liveness -------------------------------------------------------

    def _known(self, node: object, what: str = "node") -> str:
        if not isinstance(node, str) or not node:
            raise RequestError(f"{what} must be a non-empty string")
        if node not in self.nodes:
            known = ", ".join(sorted(self.nodes))
            raise RequestError(f"{what} {node!r} is not in the cluster file (nodes: {known})")
        return node

    @staticmethod
    def _pair(pair: object) -> str:
        if not isinstance(pair, str) or not pair or len(pair) > MAX_NAME:
            raise RequestError(f"pair must be a non-empty string of at most {MAX_NAME} "
                               "characters")
        return pair

    def _seen(self, node: str, now: float) -> None:
        self.last_seen[node] = max(now, self.last_seen.get(node, now))

    def heartbeat(self, node: str, now: float) -> None:
        self._seen(self._known(node), now)

    def silence(self, node: str, now: float) -> float:
        """Seconds since `node` was last heard (since start if never heard)."""
        return max(0.0, now - self.last_seen.get(node, self.started))

    def gone(self, node: str, now: float) -> bool:
        return self.silence(node, now) >= self.takeover_after

    # ---- decisions ------------------------------------------------------

    def arbitrate(self, req: ArbitrateRequest, now: float) -> Decision:
        pair = self._pair(req.pair)
        node = self._known(req.node)
        partner = self._known(req.partner, "partner")
        if node == partner:
            raise RequestError(f"node and partner are both {node!r}")
        if req.role not in ("primary", "secondary"):
            raise RequestError(f"role must be primary or secondary, not {req.role!r}")
        if not isinstance(req.generation, str):
            raise RequestError("generation must be a string")
        hold = self.holds.get(pair)
        if hold is not None and {hold.node, hold.partner} != {node, partner}:
            raise RequestError(f"pair {pair!r} is held between {hold.node} and {hold.partner}, "
                               f"not {node} and {partner}")
        self._seen(node, now)
        if hold is not None:
            if hold.node == node:
                if hold.generation != req.generation or hold.role != req.role:
                    self.holds[pair] = Hold(node, partner, req.role, req.generation)
                    self.seq += 1
                return Decision("continue", node, f"{node} already holds pair {pair}")
            return Decision("block", hold.node,
                            f"{hold.node} holds pair {pair}: {node} is the stale side "
                            "until the pair is resynchronised")
        if req.role == "primary":
            return self._grant(pair, req, f"{node} is the primary and nobody held pair {pair}")
        if self.gone(partner, now):
            return self._grant(pair, req, f"primary {partner} silent for "
                               f"{self.silence(partner, now):.1f}s "
                               f"(takeover after {self.takeover_after:g}s)")
        silence = self.silence(partner, now)
        return Decision("wait", None,
                        f"primary {partner} was heard {silence:.1f}s ago; "
                        f"{node} may take over after {self.takeover_after:g}s of silence",
                        retry_after=round(self.takeover_after - silence, 3))

    def _grant(self, pair: str, req: ArbitrateRequest, reason: str) -> Decision:
        self.holds[pair] = Hold(req.node, req.partner, req.role, req.generation)
        self.seq += 1
        return Decision("continue", req.node, reason)

    def release(self, pair: str, node: str, now: float) -> bool:
        """Drop `node`'s hold once the pair is mirrored again; False if nothing was held."""
        pair = self._pair(pair)
        node = self._known(node)
        hold = self.holds.get(pair)
        if hold is not None and hold.node != node:
            raise Conflict(f"pair {pair!r} is held by {hold.node}; only the holder can "
                           "release it")
        self._seen(node, now)
        if hold is None:
            return False
        del self.holds[pair]
        self.seq += 1
        return True

    # ---- views and persistence -------------------------------------------

    def holder(self, pair: str) -> str | None:
        hold = self.holds.get(pair)
        return hold.node if hold else None

    def node_status(self, now: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n in sorted(self.nodes):
            seen = self.last_seen.get(n)
            out[n] = {"last_heartbeat_ago": None if seen is None else round(now - seen, 3),
                      "gone": self.gone(n, now)}
        return out

    def snapshot(self) -> dict[str, Any]:
        """What must survive a restart: the holds (liveness is re-learned)."""
        state = State(STATE_FORMAT, self.seq, dict(sorted(self.holds.items())))
        return msgspec.to_builtins(state)  # type: ignore[no-any-return]

    def restore(self, data: Any) -> None:
        try:
            state = msgspec.convert(data, State)
        except msgspec.ValidationError as e:
            raise StateError(f"not a witness state: {e}") from None
        if state.format != STATE_FORMAT:
            raise StateError(f"unknown state format {state.format!r} (expected {STATE_FORMAT})")
        for pair, hold in state.holds.items():
            if not pair or hold.node == hold.partner:
                raise StateError(f"hold for pair {pair!r} is inconsistent")
        self.holds = dict(state.holds)
        self.seq = state.seq

    def unknown_holders(self) -> list[str]:
        """Pairs held by nodes no longer in the cluster file (an operator should look)."""
        return sorted(p for p, h in self.holds.items() if h.node not in self.nodes)
