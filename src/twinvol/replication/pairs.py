"""Pair records (one per pair per node) and the generation rules that decide resync direction.

Generations follow DRBD's data-generation UUIDs: both sides share `current`
while mirrored; a side that starts writing without its partner pushes its
`current` onto `history` and takes a new one. On reconnect, the side whose
history contains the other's current is newer and is the resync source; if
neither contains the other's, both wrote alone: split brain, never resolved
automatically.
"""

from __future__ import annotations

import json
import secrets
import sqlite3

import msgspec

from twinvol import clock
from twinvol.replication.core.generations import Direction, compare
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.storage.records import RecordTable

REMOTE_MODES = ("async", "sync")
HISTORY = 8



class PairRecord(msgspec.Struct):
    """This node's view of one pair, stored in its catalog and shown by `pair show`."""

    name: str
    mode: str                       # active-active | async | sync
    role: Role                      # primary | secondary | standby (async: feeds on loss)
    volume: str                     # local volume name
    partner: str                    # partner node
    partner_volume: str
    state: PairState
    io_mode: Mode
    gen_current: str
    gen_history: list[str] = msgspec.field(default_factory=list)
    copy_cursor: int = 0            # chunks below this were copied (initial copy / resync)
    copy_total: int = 0
    copy_source: str = ""           # node that feeds the running copy
    own_identity: dict[str, object] = msgspec.field(default_factory=dict)
    group: str = ""                 # consistency group (async / sync remote copies)
    copy_rate: int = 0              # pace of copies this node feeds, bytes/s (0: unlimited)
    rebooted: bool = False          # the machine restarted since the copies last met

    @property
    def remote(self) -> bool:
        """A remote copy (journal-based, `async` or `sync`), not an active-active pair."""
        return self.mode in REMOTE_MODES
    reason: str = ""
    updated: float = 0.0


def new_generation() -> str:
    return secrets.token_hex(8)


def fork_generation(rec: PairRecord) -> None:
    """This side starts writing without its partner: a new generation."""
    rec.gen_history = [rec.gen_current, *rec.gen_history][:HISTORY]
    rec.gen_current = new_generation()


def resync_direction(mine_current: str, mine_history: list[str], peer_current: str,
                     peer_history: list[str]) -> Direction:
    """Which way data must flow when two sides of a pair meet again (`compare` also
    says which rule decided)."""
    return compare(mine_current, mine_history, peer_current, peer_history).direction


class PairStore:
    """Pair records in the node's catalog database (same transactional guarantees)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.table = RecordTable(db, "pairs", PairRecord)

    def all(self) -> list[PairRecord]:
        return self.table.all()

    def save(self, rec: PairRecord) -> None:
        rec.updated = clock.wall()
        self.table.save(rec.name, rec)

    def delete(self, name: str) -> None:
        self.table.delete(name)


def dumps(rec: PairRecord) -> str:
    return json.dumps(msgspec.to_builtins(rec))
