"""The witness's rules over etcd state, pure: what etcd holds in, what to write out.

The etcd backend keeps, under its prefix:

* ``holds/PAIR`` -- the sticky `Hold` of a broken pair, a plain key with no lease: it
  survives every restart of etcd and of the nodes, like the builtin witness's state file;
* ``alive/NODE`` -- attached to the node's etcd lease (TTL `lease_ttl`), kept alive by its
  heartbeats: the key vanishes when the node has been silent for a whole TTL.

The verdicts are the `Arbiter`'s own (logic.py), computed from one consistent read of
those keys: a missing ``alive/PARTNER`` counts as a primary silent for `takeover_after`
(= the TTL), a live one as heard ``TTL - remaining`` seconds ago. What the arbiter
would change becomes one etcd transaction that compares the revisions read (the hold's
``mod_revision``, the partner's ``alive`` key, this node's own lease), so two nodes
racing for a pair can never both get ``continue``: the loser's transaction fails and it
reads again.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from twinvol.witness.logic import Arbiter, ArbitrateRequest, Decision, Hold


class Alive(msgspec.Struct, forbid_unknown_fields=True):
    """The value of ``alive/NODE``: which etcd lease keeps it."""

    node: str
    lease: int


@dataclass(frozen=True, slots=True)
class Seen:
    """What one read found about a pair: its hold (with the revision it was read at) and
    the partner's liveness (`partner_left`: seconds its lease still runs, None if gone)."""

    hold: Hold | None
    hold_rev: int
    partner_left: float | None
    partner_rev: int   # mod_revision of alive/PARTNER, 0 if absent


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict, and the hold to store first (None: nothing to write)."""

    decision: Decision
    write: Hold | None


def _arbiter(nodes: Iterable[str], ttl: float) -> Arbiter:
    return Arbiter(nodes, 0.0, takeover_after=ttl)


def arbitrate(req: ArbitrateRequest, nodes: Iterable[str], ttl: float, seen: Seen) -> Outcome:
    """The Arbiter's verdict for `req` given what etcd holds (raises RequestError)."""
    arb = _arbiter(nodes, ttl)
    if seen.hold is not None:
        arb.holds[req.pair] = seen.hold
    silent = ttl if seen.partner_left is None else max(0.0, ttl - seen.partner_left)
    arb.last_seen[req.partner] = -silent
    seq = arb.seq
    decision = arb.arbitrate(req, 0.0)
    write = arb.holds.get(req.pair) if arb.seq != seq else None
    if write is not None and seen.hold is None and req.role == "secondary":
        decision.reason = (f"primary {req.partner} has no live etcd lease (no keepalive "
                           f"for {ttl:g}s)")
    return Outcome(decision, write)


def release(pair: str, node: str, nodes: Iterable[str], hold: Hold | None) -> bool:
    """Whether `node` may delete the hold (False: nothing held; Conflict: not its hold)."""
    arb = _arbiter(nodes, 1.0)
    if hold is not None:
        arb.holds[pair] = hold
    return arb.release(pair, node, 0.0)


# ---- the etcd v3 JSON encoding (the gRPC gateway's) ---------------------------------

def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def range_end(prefix: str) -> str:
    """The end of the key range holding every key under `prefix` (base64)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


def compare_mod(key: str, rev: int) -> dict[str, Any]:
    """The key is unchanged since it was read (rev 0: it still does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}


def compare_lease(key: str, lease: int) -> dict[str, Any]:
    """The key is still attached to `lease` (the caller's right to be granted)."""
    return {"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def get(key: str, prefix: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key)}
    if prefix:
        req["range_end"] = range_end(key)
    return {"request_range": req}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


@dataclass(frozen=True, slots=True)
class Kv:
    key: str
    value: bytes
    mod_revision: int
    lease: int


def kvs(response: dict[str, Any]) -> list[Kv]:
    """The keys of a range response (a txn's ``response_range`` or /v3/kv/range)."""
    return [Kv(unb64(kv["key"]).decode(), unb64(kv.get("value", "")),
               int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
            for kv in response.get("kvs", [])]


def decode_hold(value: bytes) -> Hold:
    return msgspec.json.decode(value, type=Hold)


def decode_alive(value: bytes) -> Alive:
    return msgspec.json.decode(value, type=Alive)


__all__ = ["Alive", "Kv", "Outcome", "Seen", "arbitrate", "b64", "compare_lease",
           "compare_mod", "decode_alive", "decode_hold", "delete", "get", "kvs", "put",
           "range_end", "release", "unb64"]
