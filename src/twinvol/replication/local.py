"""Local copy pairs: two volumes of one node kept identical, split into point-in-time copies.

The in-node copy (Hitachi ShadowImage): `copying` runs the initial copy (or a resync)
from the primary to the secondary while every write to the primary also goes to the
secondary; `mirrored` keeps doing so; `split` freezes the secondary as a point-in-time
copy of the primary (writes acknowledged before the split are in it, none after), and
from then on both sides mark the chunks they change in their own persistent dirty
bitmap (bit durable before the write), so `resync` copies only those chunks back.

Mirroring happens where the data is written: while paired, the primary's backing store
is replaced by a `PrimaryStore` on the same file, so every writer of the volume (host
connections, an active-active partner's mirrored writes, a remote copy being applied)
reaches the secondary too, and a local pair composes with the other pair modes. The
secondary serves no host while paired (its export is `block`ed); once split it serves
its own export, or the primary's through the switching table.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from twinvol import clock
from twinvol.nbd.constants import Cmd
from twinvol.replication.backend import AsyncWriteBackend, apply_write
from twinvol.replication.bitmap import CHUNK, PersistentBits, chunks_of, nchunks
from twinvol.replication.core import states
from twinvol.replication.core.pace import Pace
from twinvol.replication.core.types import PairState
from twinvol.replication.ports import ManagerPort
from twinvol.replication.wire import Payload
from twinvol.storage.backing import BackingStore
from twinvol.storage.records import RecordTable
from twinvol.storage.volumes import Volume, VolumeError

if TYPE_CHECKING:
    from twinvol.nbd.aio import Backend

log = logging.getLogger("twinvol.local")
_S = TypeVar("_S", bound=BackingStore)

LOCAL_STATES = ("copying", "mirrored", "split", "suspended")
STEP_CHUNKS = 16        # chunks copied per event-loop step
CHECKPOINT_CHUNKS = 256  # chunks between durable checkpoints of a copy...
CHECKPOINT_SECONDS = 0.5  # ...or seconds, whichever comes first (a paced copy resumes)



class LocalPairRecord(msgspec.Struct):
    """A local pair in the node's catalog."""

    name: str
    primary: str            # volume names on this node
    secondary: str
    state: str              # copying | mirrored | split | suspended
    reason: str = ""
    copy_total: int = 0     # chunks the running (or last) copy had to move
    split_at: float = 0.0   # wall time of the point-in-time split
    copy_rate: int = 0      # copy pace in bytes/s (0: as fast as it goes), leaves room for hosts
    created: float = 0.0
    updated: float = 0.0


class PrimaryStore(BackingStore):
    """The primary's store while paired: same file; writes reach the secondary while
    mirroring, and mark the primary's dirty bitmap while split."""

    pair: LocalPair | None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        lp = self.pair
        if lp is None:
            return super().pwrite(offset, data)
        if not lp.mirroring:
            lp.mark(lp.pbits, offset, len(data))
            return lp.praw.pwrite(offset, data)
        lp.praw.pwrite(offset, data)
        lp.to_secondary("pwrite", offset, len(data), data)

    def trim(self, offset: int, length: int) -> None:
        lp = self.pair
        if lp is None:
            return super().trim(offset, length)
        if not lp.mirroring:
            lp.mark(lp.pbits, offset, length)
            return lp.praw.trim(offset, length)
        lp.praw.trim(offset, length)
        lp.to_secondary("trim", offset, length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None:
        lp = self.pair
        if lp is None:
            return super().write_zeroes(offset, length, no_hole=no_hole, fast=fast)
        if not lp.mirroring:
            lp.mark(lp.pbits, offset, length)
            return lp.praw.write_zeroes(offset, length, no_hole=no_hole, fast=fast)
        lp.praw.write_zeroes(offset, length, no_hole=no_hole, fast=fast)
        lp.to_secondary("write_zeroes", offset, length, no_hole)

    def flush(self) -> None:
        super().flush()
        lp = self.pair
        if lp is not None and lp.mirroring:
            lp.sraw.flush()


class SecondaryStore(BackingStore):
    """The secondary's store while paired: read-only until split, then writes mark the
    secondary's dirty bitmap (chunks a resync must take back from the primary)."""

    pair: LocalPair | None

    def _raw(self, offset: int, length: int) -> BackingStore:
        lp = self.pair
        if lp is None:
            return _adopt(BackingStore, self)
        if lp.mirroring:
            raise OSError(errno.EROFS, f"volume {lp.rec.secondary!r} is the secondary of "
                                       f"local pair {lp.rec.name!r} ({lp.rec.state}); split "
                                       "the pair to write to it")
        lp.mark(lp.sbits, offset, length)
        return lp.sraw

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._raw(offset, len(data)).pwrite(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self._raw(offset, length).trim(offset, length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None:
        self._raw(offset, length).write_zeroes(offset, length, no_hole=no_hole, fast=fast)


def _adopt(cls: type[_S], store: BackingStore) -> _S:
    """The same open file under another store class (no second descriptor)."""
    obj = cls.__new__(cls)
    obj.__dict__.update({k: v for k, v in store.__dict__.items() if k != "pair"})
    return obj


@dataclass
class LocalPair:
    """A local pair's runtime: both volumes, both dirty bitmaps, the copy task."""

    rec: LocalPairRecord
    pvol: Volume
    svol: Volume
    pbits: PersistentBits   # chunks the secondary lacks (primary writes while split, copy)
    sbits: PersistentBits   # chunks the secondary changed while split
    praw: BackingStore      # plain stores on the same files, for the pair's own I/O
    sraw: BackingStore
    copy_task: asyncio.Task[None] | None = None
    copied_bytes: int = 0
    on_error: Any = None

    @property
    def mirroring(self) -> bool:
        return self.rec.state in ("copying", "mirrored")

    def mark(self, bits: PersistentBits, offset: int, length: int) -> None:
        """Record changed chunks, durably before the write they cover."""
        if bits.set_many(chunks_of(offset, length)):
            bits.sync_now()

    def to_secondary(self, op: str, offset: int, length: int,
                     data: bytes | bytearray | memoryview | bool = False) -> None:
        """Apply a mirrored write to the secondary's file; on failure the primary keeps
        the write, the chunk is marked and the pair is suspended (never a host error)."""
        try:
            if op == "pwrite":
                assert not isinstance(data, bool)
                self.sraw.pwrite(offset, data)
            elif op == "trim":
                self.sraw.trim(offset, length)
            else:
                self.sraw.write_zeroes(offset, length, no_hole=bool(data), fast=False)
        except OSError as e:
            self.mark(self.pbits, offset, length)
            if self.on_error is not None:
                self.on_error(self, f"secondary write failed: {e.strerror or e}")


class LocalTargetBackend(AsyncWriteBackend):
    """A host export switched to the secondary of a local pair (see node/switching.py):
    reads come from the secondary; while paired, writes take the primary's own path
    (which mirrors them here), so the pair and any pair of the primary stay consistent;
    once split, writes go to the secondary alone."""

    def __init__(self, copies: LocalCopies, lp: LocalPair) -> None:
        super().__init__(lp.svol.store)
        self.copies = copies
        self.lp = lp

    def flush(self) -> None:
        self.lp.svol.store.flush()
        if self.lp.mirroring:
            self.lp.pvol.store.flush()

    def submit(self, cmd: int, offset: int, length: int, data: Payload | None,
               flags: int) -> Awaitable[None]:
        lp = self.lp
        target: Backend = self.copies.node.volume_backend(lp.pvol) if lp.mirroring \
            else lp.svol.store
        submit = getattr(target, "submit", None)
        if getattr(target, "async_writes", False) and submit is not None:
            return submit(cmd, offset, length, data, flags)  # type: ignore[no-any-return]
        return self._sync(target, cmd, offset, length, data, flags)

    async def _sync(self, target: Backend, cmd: int, offset: int, length: int,
                    data: Payload | None, flags: int) -> None:
        loop = asyncio.get_running_loop()
        apply_write(target, cmd, offset, length, data, flags)
        if cmd == Cmd.FLUSH or flags & 1:
            await loop.run_in_executor(self.copies.node.executor, target.flush)


class LocalCopies:
    """The local pairs of one node (owned by its replication manager)."""

    def __init__(self, mgr: ManagerPort) -> None:
        self.mgr = mgr
        self.node = mgr.node
        self.table = RecordTable(self.node.volumes.catalog.db, "local_pairs",
                                 LocalPairRecord)
        self.pairs: dict[str, LocalPair] = {}
        self.by_volume: dict[str, LocalPair] = {}   # primary and secondary volume names
        for rec in self.table.all():
            try:
                self._load(rec)
            except VolumeError as e:
                log.error("local pair not loaded", extra={"pair": rec.name, "error": str(e)})

    # ---- records and lifecycle ----------------------------------------------------

    def save(self, lp: LocalPair) -> None:
        lp.rec.updated = clock.wall()
        self.table.save(lp.rec.name, lp.rec)

    def _bits(self, name: str, side: str, vol: Volume) -> PersistentBits:
        return PersistentBits(os.path.join(self.mgr.bitmap_dir, f"{name}.local-{side}"),
                              nchunks(vol.record.size))

    def _load(self, rec: LocalPairRecord) -> LocalPair:
        vols = self.node.volumes
        pvol, svol = vols.get(rec.primary), vols.get(rec.secondary)
        lp = LocalPair(rec, pvol, svol, self._bits(rec.name, "p", pvol),
                       self._bits(rec.name, "s", svol), _adopt(BackingStore, pvol.store),
                       _adopt(BackingStore, svol.store), on_error=self._suspend)
        pstore = _adopt(PrimaryStore, pvol.store)
        sstore = _adopt(SecondaryStore, svol.store)
        pstore.pair = sstore.pair = lp
        pvol.store, svol.store = pstore, sstore
        self.pairs[rec.name] = lp
        self.by_volume[rec.primary] = self.by_volume[rec.secondary] = lp
        self._secondary_mode(lp)
        return lp

    def _secondary_mode(self, lp: LocalPair) -> None:
        if lp.mirroring:
            self.node.set_io_mode(lp.rec.secondary, "block",
                                  f"secondary of local pair {lp.rec.name!r} ({lp.rec.state})",
                                  expected=True)
        else:
            self.node.set_io_mode(lp.rec.secondary, "local", f"local pair {lp.rec.name!r} split")

    async def start(self) -> None:
        for lp in self.pairs.values():
            if lp.rec.state == "copying":
                self._start_copy(lp)

    async def stop(self) -> None:
        for lp in self.pairs.values():
            if lp.copy_task is not None:
                lp.copy_task.cancel()
        for lp in self.pairs.values():
            for bits in (lp.pbits, lp.sbits):
                with contextlib.suppress(OSError):
                    bits.sync_now()
                bits.close()

    def _set_state(self, lp: LocalPair, state: str, reason: str = "") -> None:
        old = lp.rec.state
        states.check(lp.rec.name, PairState(old), PairState(state))
        lp.rec.state, lp.rec.reason = state, reason
        self.save(lp)
        if old != state:
            self.node.events.publish("pair_state", pair=lp.rec.name, state=state, previous=old,
                                     reason=reason, role="primary", mode="local")

    def _suspend(self, lp: LocalPair, reason: str) -> None:
        log.error("local pair suspended", extra={"pair": lp.rec.name, "reason": reason})
        if lp.copy_task is not None:
            lp.copy_task.cancel()
        self._set_state(lp, "suspended", reason)
        self._secondary_mode(lp)

    # ---- operator commands ----------------------------------------------------------

    def get(self, name: str) -> LocalPair:
        lp = self.pairs.get(name)
        if lp is None:
            raise VolumeError(f"pair {name!r} does not exist on node {self.node.name}",
                              "not_found")
        return lp

    def _in_pair(self, vol: str) -> str | None:
        if vol in self.by_volume:
            return self.by_volume[vol].rec.name
        for pr in self.mgr.pairs.values():
            if pr.rec.volume == vol:
                return pr.rec.name
        return None

    async def create(self, name: str, primary: str, secondary: str, copy_rate: int = 0
                     ) -> LocalPair:
        if name in self.pairs or name in self.mgr.pairs:
            raise VolumeError(f"pair {name!r} already exists", "conflict")
        if primary == secondary:
            raise VolumeError("a local pair needs two different volumes")
        vols = self.node.volumes
        pvol = vols.get(primary)
        if primary in self.by_volume:
            raise VolumeError(f"volume {primary!r} is already in local pair "
                              f"{self.by_volume[primary].rec.name!r}", "conflict")
        try:
            svol = vols.get(secondary)
        except VolumeError:
            svol = vols.create(secondary, pvol.record.size,
                               description=f"local copy of {primary}")
            self.node.events.publish("volume_created", volume=secondary,
                                     export=svol.record.export_name)
        other = self._in_pair(secondary)
        if other is not None:
            raise VolumeError(f"volume {secondary!r} is already in pair {other!r}; a local "
                              "copy's secondary must be in no other pair", "conflict")
        if svol.record.size != pvol.record.size:
            raise VolumeError(f"volume {secondary!r} is {svol.record.size} bytes but "
                              f"{primary!r} is {pvol.record.size}; sizes must match")
        if svol.connections:
            raise VolumeError(f"volume {secondary!r} has {svol.connections} NBD connection(s); "
                              "its data will be overwritten: disconnect them first", "busy")
        if svol.record.read_only:
            raise VolumeError(f"volume {secondary!r} is read-only")
        rec = LocalPairRecord(name=name, primary=primary, secondary=secondary,
                              state="copying", created=clock.wall(), copy_rate=copy_rate)
        self.table.insert(name, rec)
        lp = self._load(rec)
        lp.sbits.clear_all()
        lp.pbits.set_all()
        lp.pbits.sync_now()
        lp.sbits.sync_now()
        # Connections opened before the pair write to the plain store: give them the
        # paired one (drained first, so no write escapes the mirror).
        await self.node.rebind_export(pvol.record.export_name)
        self.node.events.publish("pair_created", pair=name, role="primary", mode="local",
                                 partner=self.node.name)
        self._start_copy(lp)
        return lp

    async def split(self, name: str) -> LocalPair:
        lp = self.get(name)
        if lp.rec.state != "mirrored":
            raise VolumeError(f"local pair {name!r} is {lp.rec.state}; split needs mirrored "
                              "(wait for the copy to finish)")
        # Host connections switched to the secondary write through the primary while
        # mirrored: let their writes in flight land before the point in time.
        await self.node.switching.barrier(lp.rec.secondary)
        lp.rec.split_at = clock.wall()
        self._set_state(lp, "split", "split by operator")
        await asyncio.get_running_loop().run_in_executor(self.node.executor, lp.sraw.flush)
        self._secondary_mode(lp)
        return lp

    async def resync(self, name: str) -> LocalPair:
        lp = self.get(name)
        if lp.rec.state in ("copying", "mirrored"):
            return lp
        self.node.switching.check_free(lp.rec.secondary, f"resync local pair {name!r}")
        # The secondary's own changes are discarded: its chunks come back from the primary.
        self.node.set_io_mode(lp.rec.secondary, "block", f"local pair {name!r} resyncing",
                              expected=True)
        for c in lp.sbits.iter_set():
            lp.pbits.set(c)
        lp.sbits.clear_all()
        lp.pbits.sync_now()
        lp.sbits.sync_now()
        self._set_state(lp, "copying", "resync")
        self._start_copy(lp)
        return lp

    async def delete(self, name: str) -> None:
        lp = self.get(name)
        self.node.switching.check_free(lp.rec.secondary, f"delete local pair {name!r}")
        self.node.switching.check_free(lp.rec.primary, f"delete local pair {name!r}")
        if lp.copy_task is not None:
            lp.copy_task.cancel()
        for vol in (lp.pvol, lp.svol):
            store = vol.store
            vol.store = _adopt(BackingStore, store)
            store.pair = None  # type: ignore[attr-defined]  # references held elsewhere
        self.table.delete(name)
        del self.pairs[name]
        self.by_volume.pop(lp.rec.primary, None)
        self.by_volume.pop(lp.rec.secondary, None)
        for bits in (lp.pbits, lp.sbits):
            bits.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bits.path)
        self.node.set_io_mode(lp.rec.secondary, "local", "local pair deleted")
        self.node.events.publish("pair_deleted", pair=name, mode="local")

    # ---- the copy -----------------------------------------------------------------

    def _start_copy(self, lp: LocalPair) -> None:
        if lp.copy_task is None or lp.copy_task.done():
            lp.copy_task = asyncio.ensure_future(self._copy(lp))

    def _copy_chunk(self, lp: LocalPair, chunk: int) -> int:
        """Copy one chunk in this loop step (a host write to it is mirrored after it)."""
        src, dst = lp.praw, lp.sraw
        off = chunk * CHUNK
        n = min(CHUNK, lp.pvol.record.size - off)
        ext = src.extents(off, n)
        if len(ext) == 1 and ext[0][1] & 2:
            dst.write_zeroes(off, n, no_hole=False, fast=False)
            return 0
        dst.pwrite(off, src.pread(off, n))
        return n

    async def _copy(self, lp: LocalPair) -> None:
        """Copy every chunk marked in the primary's bitmap, then go mirrored."""
        rec, ex = lp.rec, self.node.executor
        loop = asyncio.get_running_loop()
        todo = [c for c in lp.pbits.iter_set() if c * CHUNK < lp.pvol.record.size]
        rec.copy_total = len(todo)
        lp.copied_bytes = 0
        started = clock.monotonic()
        self.save(lp)
        done: list[int] = []
        checkpoint = started
        pace = Pace()
        try:
            for i, chunk in enumerate(todo):
                lp.copied_bytes += self._copy_chunk(lp, chunk)
                done.append(chunk)
                if len(done) >= CHECKPOINT_CHUNKS or i == len(todo) - 1 \
                        or clock.monotonic() - checkpoint > CHECKPOINT_SECONDS:
                    checkpoint = clock.monotonic()
                    # Data durable first, then the bits that say it is there.
                    await loop.run_in_executor(ex, lp.sraw.flush)
                    for c in done:
                        lp.pbits.clear(c)
                    done.clear()
                    await lp.pbits.sync(ex)
                elif (i + 1) % STEP_CHUNKS == 0:
                    await asyncio.sleep(0)
                if (i + 1) % STEP_CHUNKS == 0:
                    ahead = pace.delay(rec.copy_rate, (i + 1) * CHUNK, clock.monotonic())
                    if ahead:
                        await asyncio.sleep(ahead)
            self._set_state(lp, "mirrored")
            self.node.events.publish("copy_done", pair=rec.name, bytes=lp.copied_bytes,
                                     seconds=round(clock.monotonic() - started, 3))
        except OSError as e:
            self._suspend(lp, f"copy failed: {e.strerror or e}")

    # ---- views --------------------------------------------------------------------

    def view(self, lp: LocalPair) -> dict[str, Any]:
        rec = lp.rec
        running = lp.copy_task is not None and not lp.copy_task.done()
        remaining = lp.pbits.count() if rec.state == "copying" else 0
        return {
            "name": rec.name, "mode": "local", "node": self.node.name, "role": "primary",
            "volume": rec.primary, "partner": self.node.name, "partner_volume": rec.secondary,
            "state": rec.state, "io_mode": lp.pvol.io_mode,
            "secondary_io_mode": lp.svol.io_mode, "reason": rec.reason,
            "generation": {"current": "", "history": []}, "peer_link": "local",
            "dirty_chunks": lp.pbits.count(), "secondary_dirty_chunks": lp.sbits.count(),
            "chunk_size": CHUNK, "export_name": lp.pvol.record.export_name,
            "secondary_export_name": lp.svol.record.export_name,
            "split_at": rec.split_at or None, "copy_rate": rec.copy_rate,
            "copy": {"running": running, "source": self.node.name if running else "",
                     "cursor": rec.copy_total - remaining, "remaining_chunks": remaining,
                     "total_chunks": rec.copy_total, "bytes_sent": lp.copied_bytes},
        }
