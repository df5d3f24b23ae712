"""What replication needs from the node it runs in, as protocols.

The node package builds on replication, never the reverse: the node (`node/daemon.py`)
satisfies `NodePort`, and replication reaches host connections only through its I/O
gate methods (`set_io_mode`, `fence`, `unfence`, `drop_clients`, `rebind_export`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import Executor
from typing import Any, Protocol

from twinvol.cluster import ClusterConfig, NodeConfig
from twinvol.nbd.aio import Backend
from twinvol.replication.core.lease import LeaseConfig
from twinvol.replication.core.types import GroupRole
from twinvol.replication.pairs import PairRecord, PairStore
from twinvol.replication.peer_service import PeerService
from twinvol.replication.runtime import GroupRecord, GroupRuntime, PairRuntime
from twinvol.replication.wire import Payload
from twinvol.storage.volumes import Volume, VolumeManager
from twinvol.witness.logic import Decision


class EventSink(Protocol):
    def publish(self, type_: str, **fields: Any) -> dict[str, Any]: ...


class SwitchingPort(Protocol):
    """The node's switching table, as far as copies must respect it."""

    def check_free(self, volume: str, action: str) -> None: ...

    async def barrier(self, volume: str) -> None: ...


class NodePort(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> ClusterConfig: ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def data_dir(self) -> str: ...

    @property
    def executor(self) -> Executor: ...

    @property
    def volumes(self) -> VolumeManager: ...

    @property
    def events(self) -> EventSink: ...

    @property
    def switching(self) -> SwitchingPort: ...

    def volume_backend(self, vol: Volume) -> Backend:
        """What host I/O to `vol` goes through (its pair's write path, or its store)."""

    def set_io_mode(self, vol_name: str, mode: str, reason: str = "", *,
                    expected: bool = False) -> None: ...

    def fence(self, vol_name: str, reason: str) -> None: ...

    def unfence(self, vol_name: str) -> None: ...

    def drop_clients(self, vol_name: str) -> None: ...

    async def rebind_export(self, name: str, timeout: float = 10.0) -> None: ...


class ManagerPort(Protocol):
    """The pair manager as remote copy, disaster recovery and local copies use it."""

    node: NodePort
    pairs: dict[str, PairRuntime]
    by_volume: dict[str, PairRuntime]
    peers: PeerService
    store: PairStore
    bitmap_dir: str

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]: ...

    def get(self, name: str) -> PairRuntime: ...

    def release(self, pr: PairRuntime) -> None: ...

    @property
    def witness(self) -> Any: ...

    def decide(self, rec: PairRecord) -> Awaitable[Decision]:
        """Ask the witness (or the no-witness rule) whether this side may go alone."""

    @property
    def holds(self) -> dict[str, str]: ...

    @property
    def lease_config(self) -> LeaseConfig: ...

    def save(self, pr: PairRuntime) -> None: ...

    def load(self, rec: PairRecord) -> PairRuntime: ...

    def set_state(self, pr: PairRuntime, state: str, reason: str = "") -> None: ...

    def set_mode(self, pr: PairRuntime, mode: str, reason: str = "",
                 save: bool = True) -> None: ...

    def start_copy(self, pr: PairRuntime) -> None: ...

    def link_or_none(self, peer: str) -> Any: ...

    def apply(self, pr: PairRuntime, cmd: int, offset: int, length: int,
              data: Payload | None, flags: int) -> None: ...

    def take_identity(self, name: str, vname: str, size: int, h: dict[str, Any]
                      ) -> tuple[Volume, dict[str, object]]: ...

    def hold(self, volume: str, reason: str) -> None: ...

    def unhold(self, volume: str) -> None: ...

    async def swap(self, name: str) -> PairRecord:
        """Swap the roles of a mirrored pair (both sides agree)."""


class RemotePort(Protocol):
    """Remote copy as its parts (disaster recovery, the far target) use it."""

    mgr: ManagerPort
    node: NodePort
    groups: dict[str, GroupRuntime]
    feeds: dict[str, GroupRuntime]

    def save(self, g: GroupRuntime) -> None: ...

    def mark(self, pr: PairRuntime, offset: int, length: int) -> None: ...

    def mark_unapplied(self, g: GroupRuntime, start: int | None = None) -> None: ...

    def start_shipping(self, g: GroupRuntime) -> None: ...

    def checkpoint_now(self, g: GroupRuntime) -> None: ...


    def group_of(self, name: str) -> GroupRuntime: ...

    def taken_over(self, g: GroupRuntime) -> None: ...

    def suspend(self, g: GroupRuntime, reason: str) -> None: ...

    def overflow(self, g: GroupRuntime, reason: str, event: str = "journal_overflow",
                 drop_inflight: bool = False) -> None: ...

    def pair_of(self, g: GroupRuntime, volume: str) -> PairRuntime: ...

    def open_group(self, rec: GroupRecord) -> GroupRuntime: ...

    def on_applied(self, volume: str, cmd: int, offset: int, length: int,
                   data: Payload | None, flags: int, *, committed: bool) -> int: ...

    def ensure_group(self, name: str, role: GroupRole, target: str, feeder: str,
                     limit: int) -> GroupRuntime: ...


class CopyFeedPort(Protocol):
    """Remote copy as the copier sees it: a chunk sent to a far copy or a standby tells
    which write it reflects, and the end of a copy moves the group on."""

    @property
    def feeds(self) -> dict[str, GroupRuntime]: ...

    def written_for(self, volume: str) -> int: ...

    def committed_for(self, volume: str) -> int: ...

    def copy_done(self, pr: PairRuntime) -> None: ...

    def failback_copied(self, pr: PairRuntime) -> None: ...

    def target_copied(self, pr: PairRuntime, upto: int, committed: int = -1) -> None: ...


class JournalFeedPort(Protocol):
    """Remote copy as the write path sees it: writes to a volume that feeds a far copy
    get a sequence number and a journal record."""

    @property
    def feeds(self) -> dict[str, GroupRuntime]: ...

    def on_applied(self, volume: str, cmd: int, offset: int, length: int,
                   data: Payload | None, flags: int, *, committed: bool) -> int: ...

    def commit(self, volume: str, seq: int) -> None: ...

    def settle(self, volume: str, seq: int, acknowledged: bool) -> None: ...

    def on_standby_write(self, volume: str, seq: int, cmd: int, offset: int, length: int,
                         data: Payload | None, flags: int) -> None: ...

    def on_copied(self, volume: str, offset: int, length: int, seq: int) -> None: ...

    def check_feeder(self, pr: PairRuntime, peer: str, chunks: range) -> None: ...


class SidesPort(Protocol):
    """Remote copy as pair commands see it: the other nodes of an async pair."""

    def other_sides(self, pr: PairRuntime) -> list[str]: ...

    def detach(self, pr: PairRuntime) -> None: ...
