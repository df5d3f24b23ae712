"""The in-memory state of pairs and consistency groups, shared by the manager, remote
copy, disaster recovery and local copies (one module, so none of them imports another
for its types)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec

from twinvol.replication.bitmap import PersistentBits
from twinvol.replication.core.lease import PeerLease
from twinvol.replication.core.stall import CopyProgress
from twinvol.replication.core.types import GroupRole, GroupState, JournalMode
from twinvol.replication.pairs import PairRecord
from twinvol.storage.journal import Journal
from twinvol.storage.volumes import Volume

DEFAULT_JOURNAL = 256 * 1024 * 1024
# `consistent_at` of a far copy that lost track of how far its volume went (a damaged
# receive journal): set to what the feeder has written when it is next heard from.
UNKNOWN_END = 1 << 62


@dataclass
class PairRuntime:
    """In-memory companions of a pair record: bitmaps, copy progress, in-flight writes."""

    rec: PairRecord
    vol: Volume
    dirty: PersistentBits
    al: PersistentBits
    lease: PeerLease
    al_last: dict[int, float] = field(default_factory=dict)
    al_inflight: dict[int, int] = field(default_factory=dict)
    copy_task: asyncio.Task[None] | None = None
    verify_task: asyncio.Task[None] | None = None
    verify: dict[str, Any] = field(default_factory=dict)
    copied_bytes: int = 0       # bytes sent by the running/last copy
    copy_started: float = 0.0
    copy_error: str = ""        # the I/O error that stopped the last copy (told once)
    decide_task: asyncio.Task[None] | None = None
    # Chunks marked again while a copy runs (async catch-up): their bits stay set after
    # being sent, since the copy may have read them before the newest write.
    recopy: set[int] = field(default_factory=set)


class GroupRecord(msgspec.Struct):
    """This node's copy-management information for one consistency group."""

    name: str
    role: GroupRole
    target: str                 # the far-site node
    feeder: str                 # the node that feeds the target now
    journal_limit: int = DEFAULT_JOURNAL
    state: GroupState = GroupState.COPYING
    reason: str = ""
    mode: JournalMode = JournalMode.JOURNAL
    written: int = 0            # last sequence number written at the primary site
    written_time: float = 0.0
    sent: int = 0
    received: int = 0
    applied: int = 0            # last sequence number applied at the target (durably)
    applied_time: float = 0.0   # primary-site time of that write: the recovery point
    bitmap_until: int = 0       # (standby) dirty chunks cover writes up to this sequence
    seq_seen: int = 0           # (standby) last sequence number journaled here
    hold: bool = False          # (primary) the far copy was taken over: hosts refused here
    sync: bool = False          # host writes wait until the target has their record
    origin: str = ""            # the node that fed the group first (failback returns there)
    consistent_at: int = 0      # (target) the copy is consistent once received reaches this
    bits_until: int = 0         # (target) chunk bits stand until writes up to here commit
    bits_open: bool = False     # (target) a copy's chunk bits wait for that commit
    bytes_shipped: int = 0      # journal bytes sent to the target (all time)
    records_shipped: int = 0
    updated: float = 0.0


@dataclass
class GroupRuntime:
    rec: GroupRecord
    journal: Journal
    pairs: dict[str, PairRuntime] = field(default_factory=dict)
    inflight: dict[int, None] = field(default_factory=dict)  # assigned, not yet committed
    undecided: set[int] = field(default_factory=set)  # in flight: failed on this copy alone
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ship_task: asyncio.Task[None] | None = None
    need_stat: bool = True
    last_stat: float = 0.0
    last_save: float = 0.0
    last_progress: float = 0.0
    checkpoint_due: bool = False
    delta: dict[str, Any] = field(default_factory=dict)  # the last DR delta resync
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)  # sync
    progress: CopyProgress = field(default_factory=CopyProgress)  # (feeder) still moving?
    last_heard: float = 0.0     # (target, standby) monotonic time of the feeder's last word
    heard_sent: float = 0.0     # (target) when the feeder sent that word, by its clock
    failing_back: bool = False  # (original primary) `dr failback` from the far copy runs
    failbacks: int = 0          # (original primary) failbacks done since this node started
    checking_until: float = 0.0  # (feeder, restarted) hosts held until the target answers

    def committed(self) -> int:
        """Highest sequence number below which every record may be shipped."""
        for seq in self.inflight:
            return seq - 1
        return self.rec.written

    def volumes(self) -> list[str]:
        return [pr.rec.volume for pr in self.pairs.values()]
