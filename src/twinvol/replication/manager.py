"""The pairs of one node: their records and runtime state, I/O modes, creation, and the
routing of peer messages to the collaborators that do the work:

- writes.py: the mirrored write path and the partner's apply;
- copier.py: initial copy and resync of dirty chunks;
- partners.py: partner loss (the core's decision machine) and meeting again;
- leases.py: the right of a mirrored copy to serve;
- commands.py: split, resync, swap, delete;
- verify.py: the management check that compares and repairs the copies;
- remote.py / dr.py / local.py: remote copy, disaster recovery, local copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from twinvol import clock
from twinvol.nbd.constants import Err
from twinvol.replication import data_messages as dm
from twinvol.replication.activity import machine_restarted, retire_idle_extents
from twinvol.replication.apply import PartnerApply
from twinvol.replication.backend import apply_write
from twinvol.replication.bitmap import AL_EXTENT, CHUNK, PersistentBits, extent_chunks, nchunks
from twinvol.replication.commands import PairCommands
from twinvol.replication.copier import Copier
from twinvol.replication.core import states
from twinvol.replication.core.lease import LeaseConfig, PeerLease
from twinvol.replication.core.types import Mode, PairState, Role
from twinvol.replication.data_messages import TAGS as DATA_TAGS
from twinvol.replication.leases import Leases, leased
from twinvol.replication.messages import TAGS as CONTROL_TAGS
from twinvol.replication.messages import (
    BadMessage,
    Control,
    DataMapRequest,
    HashRequest,
    LeaseRequest,
    PairBlock,
    PairDelete,
    PairDone,
    PairPrepare,
    PairSplit,
    PairStateMsg,
    PairUnblock,
    PairYield,
    decode,
    encode,
)
from twinvol.replication.pairs import (
    REMOTE_MODES,
    PairRecord,
    PairStore,
    new_generation,
)
from twinvol.replication.partners import Partners
from twinvol.replication.peer import (
    Later,
    Message,
    Outcomes,
    PeerDown,
    RemoteError,
)
from twinvol.replication.peer_service import PeerService
from twinvol.replication.ports import NodePort
from twinvol.replication.remote import RemoteCopy
from twinvol.replication.remote_io import JournalingBackend, TakeoverBackend
from twinvol.replication.runtime import DEFAULT_JOURNAL, PairRuntime
from twinvol.replication.verify import Verifier
from twinvol.replication.wire import Header, Payload
from twinvol.replication.writes import ReplicatedBackend, WritePath
from twinvol.storage.volumes import Volume, VolumeError
from twinvol.witness.logic import Decision

log = logging.getLogger("twinvol.replication")



Decider = Callable[[PairRecord], Awaitable[Decision]]


class ReplicationManager:
    """Owns the pairs of one node and the peer messages about them."""

    def __init__(self, node: NodePort) -> None:
        self.node = node
        self.store = PairStore(node.volumes.catalog.db)
        self.pairs: dict[str, PairRuntime] = {}
        self.by_volume: dict[str, PairRuntime] = {}
        self.leases = Leases(self)
        self.partners = Partners(self, self.leases, self._remote_up)
        self.peers = PeerService(node.cluster, node.name, self._on_message, self.partners.on_up,
                                 self.partners.on_down, self.partners.on_refused)
        self.decide: Decider = self.partners.no_witness
        self.witness: Any = None
        if node.cluster.witness:
            from twinvol.witness.connect import witness_for

            self.witness = witness_for(node.cluster, self)
            if self.witness is not None:
                self.decide = self.partners.ask_witness
        self.lease_config = LeaseConfig()
        self.bitmap_dir = os.path.join(node.data_dir, "bitmaps")
        os.makedirs(self.bitmap_dir, exist_ok=True)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.holds: dict[str, str] = {}   # volume -> why host I/O is refused (see hold)
        self.remote = RemoteCopy(self)
        self.copier = Copier(self, self.remote)
        self.verifier = Verifier(self, self.copier)
        self.writes = WritePath(self, self.remote, self.partners, self.leases)
        self.partner_apply = PartnerApply(self, self.remote)
        self.commands = PairCommands(self, self.leases, self.remote)
        rebooted = machine_restarted(node.data_dir)
        for rec in self.store.all():
            if rebooted and not rec.rebooted and not rec.remote:
                rec.rebooted = True   # until the partner is met: see `core.meeting`
                self.store.save(rec)
            self.load(rec)
        from twinvol.replication.local import LocalCopies

        self.local = LocalCopies(self)   # local copy pairs (mode `local`), own table

    def _remote_up(self, peer: str) -> None:
        self.remote.on_up(peer)

    # ---- lifecycle ------------------------------------------------------------

    def load(self, rec: PairRecord) -> PairRuntime:
        vol = self.node.volumes.get(rec.volume)
        n = nchunks(vol.record.size)
        dirty = PersistentBits(os.path.join(self.bitmap_dir, f"{rec.name}.dirty"), n)
        al = PersistentBits(os.path.join(self.bitmap_dir, f"{rec.name}.al"),
                            nchunks(vol.record.size, AL_EXTENT))
        pr = PairRuntime(rec, vol, dirty, al,
                         PeerLease.after_start(self.lease_config, clock.monotonic()))
        # Recovery: extents that had writes in flight at a crash may differ from the partner.
        for ext in list(al.iter_set()):
            dirty.set_many(extent_chunks(ext, vol.record.size))
            al.clear(ext)
        dirty.sync_now()
        al.sync_now()
        self.pairs[rec.name] = pr
        if rec.remote:
            self.remote.attach(pr)
            if rec.role == "secondary":
                self.by_volume[rec.volume] = pr
                self._apply_mode(pr)
            elif rec.volume not in self.by_volume:
                self.by_volume[rec.volume] = pr
            return pr
        self.by_volume[rec.volume] = pr
        # Until the partner is met (or the witness says otherwise) a copy serves no host,
        # unless it is the side that already continues alone.
        if rec.io_mode != "local":
            self.set_mode(pr, "block", "waiting for the partner after a restart", save=False)
        else:
            self._apply_mode(pr)
        return pr

    async def start(self) -> None:
        # Recovery first (a far copy redoes its journal), then the peers may talk to us.
        await self.remote.start()
        await self.local.start()
        await self.peers.start()
        self.spawn(retire_idle_extents(self))
        self.spawn(self.leases.keeper())
        if self.witness is not None:
            self.spawn(self.partners.heartbeats())
        self.spawn(self.partners.after_restart())

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.peers.stop()
        # After the links are down: losing them starts decisions, which must not outlive
        # the catalog.
        for pr in self.pairs.values():
            for task in (pr.copy_task, pr.decide_task):
                if task is not None:
                    task.cancel()
        await self.remote.stop()
        await self.local.stop()
        if self.witness is not None:
            with contextlib.suppress(Exception):
                await self.witness.close()
        for pr in self.pairs.values():
            with contextlib.suppress(OSError):
                pr.dirty.sync_now()
                pr.al.sync_now()
            pr.dirty.close()
            pr.al.close()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def backend_for(self, vol: Volume) -> ReplicatedBackend | TakeoverBackend | None:
        pr = self.by_volume.get(vol.record.name)
        if pr is None:
            return None
        if not pr.rec.remote:
            return ReplicatedBackend(self.writes, pr)
        if pr.rec.role == "secondary":
            return TakeoverBackend(self.remote, pr)
        return JournalingBackend(self.remote, pr)

    # ---- state helpers ----------------------------------------------------------

    def save(self, pr: PairRuntime) -> None:
        self.store.save(pr.rec)

    def set_state(self, pr: PairRuntime, state: str, reason: str = "") -> None:
        if state == "mirrored" and pr.rec.rebooted:   # the copies met again and agree
            pr.rec.rebooted = False
            self.save(pr)
        if pr.rec.state != state or pr.rec.reason != reason:
            old = pr.rec.state
            states.check(pr.rec.name, old, PairState(state))
            pr.rec.state = PairState(state)
            pr.rec.reason = reason
            self.save(pr)
            self.node.events.publish("pair_state", pair=pr.rec.name, state=state, previous=old,
                                     reason=reason, role=pr.rec.role)

    def set_mode(self, pr: PairRuntime, mode: str, reason: str = "", save: bool = True) -> None:
        pr.rec.io_mode = Mode(mode)
        if save:
            self.save(pr)
        self._apply_mode(pr, reason)

    def _apply_mode(self, pr: PairRuntime, reason: str = "") -> None:
        held = self.holds.get(pr.rec.volume)
        if held is not None:
            self.node.set_io_mode(pr.rec.volume, "block", held)
            return
        rec = pr.rec
        # A far copy, or a copy target being filled, serves no host by design.
        expected = rec.role == "secondary" and (rec.remote or rec.state == "copying")
        if leased(pr):
            pr.lease.resume()
            self.leases.request(rec.partner)  # serve as soon as the partner grants
        else:
            pr.lease.drop()
            if rec.io_mode == "local":
                pr.lease.revoke()  # writing alone: the partner may not serve
        self.node.set_io_mode(rec.volume, rec.io_mode, reason, expected=expected)
        self.leases.gate(pr)

    def hold(self, volume: str, reason: str) -> None:
        """Refuse host I/O on this node's copy whatever its pairs decide (a far copy was
        taken over: this copy is not the latest until failback)."""
        self.holds[volume] = reason
        self.node.set_io_mode(volume, "block", reason)
        pr = self.by_volume.get(volume)
        if pr is not None and not pr.rec.remote:
            pr.lease.revoke()  # no lease for the partner either (`Leases.on_request`)

    def unhold(self, volume: str) -> None:
        if self.holds.pop(volume, None) is None:
            return
        pr = self.by_volume.get(volume)
        if pr is not None:
            self._apply_mode(pr, "failback done")
        else:
            self.node.set_io_mode(volume, "local", "failback done")

    # ---- pair creation (primary side drives) -------------------------------------

    async def create(self, name: str, primary_volume: str, secondary: str,
                     secondary_volume: str, mode: str = "active-active", group: str = "",
                     journal_limit: int = 0) -> PairRecord:
        if name in self.pairs:
            raise VolumeError(f"pair {name!r} already exists", "conflict")
        vol = self.node.volumes.get(primary_volume)
        if secondary == self.node.name:
            raise VolumeError("the secondary must be another node")
        self.node.cluster.node(secondary)
        if self.node.config.peer is None or self.node.cluster.node(secondary).peer is None:
            raise VolumeError("both nodes need a `peer` address in the cluster file to pair")
        if mode in REMOTE_MODES:
            return await self.remote.create(name, vol.record.name, secondary,
                                            secondary_volume, group or name,
                                            journal_limit or DEFAULT_JOURNAL,
                                            sync=mode == "sync")
        if vol.record.name in self.by_volume:
            raise VolumeError(f"volume {primary_volume!r} is already in pair "
                              f"{self.by_volume[vol.record.name].rec.name!r}", "conflict")
        try:
            link = self.peers.link(secondary)
        except PeerDown:
            raise VolumeError(f"node {secondary} is not connected (peer link down); check that "
                              "it runs and shares this cluster's secret", "io") from None
        rec = vol.record
        gen = new_generation()
        try:
            await link.request(encode(PairPrepare(
                name, secondary_volume, rec.name, rec.size, rec.serial, rec.vvol_id,
                rec.export_name, rec.description, gen)))
        except RemoteError as e:
            raise VolumeError(f"node {secondary}: {e}", e.code if e.code in (
                "invalid", "not_found", "conflict", "busy") else "io") from None
        except PeerDown as e:
            raise VolumeError(f"node {secondary} went away: {e}", "io") from None
        prec = PairRecord(name=name, mode="active-active", role=Role.PRIMARY, volume=rec.name,
                          partner=secondary, partner_volume=secondary_volume,
                          state=PairState.COPYING, io_mode=Mode.LOCAL, gen_current=gen,
                          copy_cursor=0,
                          copy_total=nchunks(rec.size), copy_source=self.node.name)
        self.store.save(prec)
        pr = self.load(prec)
        pr.dirty.set_all()
        await pr.dirty.sync(self.node.executor)
        self.node.events.publish("pair_created", pair=name, role="primary", partner=secondary)
        self.start_copy(pr)
        return prec

    def _prepare(self, peer: str, msg: PairPrepare) -> Message:
        """Secondary side of pair creation: take the primary's identity, block hosts."""
        if msg.pair in self.pairs:
            raise RemoteError(f"pair {msg.pair!r} already exists here", "conflict")
        _vol, own = self.take_identity(msg.pair, msg.volume, msg.size, encode(msg))
        rec = PairRecord(name=msg.pair, mode="active-active", role=Role.SECONDARY,
                         volume=msg.volume, partner=peer, partner_volume=msg.partner_volume,
                         state=PairState.COPYING, io_mode=Mode.BLOCK, gen_current=msg.gen,
                         copy_total=nchunks(msg.size), own_identity=own)
        self.store.save(rec)
        self.load(rec)
        self.node.events.publish("pair_created", pair=msg.pair, role="secondary",
                                 partner=rec.partner)
        return {}, b""

    def take_identity(self, name: str, vname: str, size: int, h: dict[str, Any]
                       ) -> tuple[Volume, dict[str, object]]:
        """Secondary side of pairing: the volume (created if missing) takes the primary's
        virtual identity. Returns it and its own identity (restored when unpaired)."""
        vols = self.node.volumes
        try:
            vol = vols.get(vname)
        except VolumeError:
            try:
                vol = vols.create(vname, size, export_name=f".pairing-{name}")
            except VolumeError as e:
                raise RemoteError(str(e), e.code) from None
        if vol.record.name in self.by_volume:
            raise RemoteError(f"volume {vname!r} is already in a pair", "conflict")
        if vol.record.size != size:
            raise RemoteError(f"volume {vname!r} is {vol.record.size} bytes but the primary "
                              f"volume is {size} bytes; sizes must match", "invalid")
        if vol.connections:
            raise RemoteError(f"volume {vname!r} has {vol.connections} NBD connection(s); its "
                              "data will be overwritten: disconnect them first", "busy")
        own = {"serial": vol.record.serial, "vvol_id": vol.record.vvol_id,
               "export_name": vol.record.export_name, "description": vol.record.description}
        try:
            vols.set_identity(vname, serial=str(h["serial"]), vvol_id=int(h["vvol_id"]),
                              export_name=str(h["export_name"]),
                              description=str(h["description"]))
        except VolumeError as e:
            raise RemoteError(str(e), e.code) from None
        return vol, own

    # ---- shared by the collaborators -------------------------------------------------

    def start_copy(self, pr: PairRuntime) -> None:
        if pr.copy_task is None or pr.copy_task.done():
            pr.copy_task = asyncio.ensure_future(self.copier.run(pr))

    def apply(self, pr: PairRuntime, cmd: int, offset: int, length: int,
               data: Payload | None, flags: int) -> None:
        apply_write(pr.vol.store, cmd, offset, length, data, flags)

    def link_or_none(self, peer: str) -> Any:
        try:
            return self.peers.link(peer)
        except PeerDown:
            return None

    def release(self, pr: PairRuntime) -> None:
        """Mirrored again: give the witness hold back (no-op if the partner holds it)."""
        if self.witness is None:
            return

        async def go() -> None:
            with contextlib.suppress(Exception):
                await self.witness.release(pr.rec.name, self.node.name)

        self.spawn(go())

    # ---- peer messages ---------------------------------------------------------------

    def _on_message(self, peer: str, h: Header, payload: Payload
                    ) -> Message | Awaitable[Message] | Later | Outcomes | None:
        if isinstance(h, dict):
            t = h["t"]
            if t in CONTROL_TAGS:
                try:
                    msg = decode(h)
                except BadMessage as e:
                    raise RemoteError(str(e), "invalid") from None
                return self._on_control(peer, msg, payload)
            if t not in DATA_TAGS:
                return self.remote.on_message(peer, h, payload)
            try:   # a data-path header the wire layer could not type: name the bad field
                dmsg = dm.decode(h)
            except BadMessage as e:
                raise RemoteError(str(e), "invalid") from None
        else:
            dmsg = h
        pr = self.pairs.get(dmsg.pair)
        if pr is None:
            raise RemoteError(f"no pair {dmsg.pair!r} on node {self.node.name}", "not_found")
        w = self.writes
        if isinstance(dmsg, dm.WriteBatch | dm.Write) and pr.rec.io_mode == "local" \
                and not pr.rec.remote:
            # We write alone under a newer generation: the sender is the stale side.
            raise RemoteError(f"pair {pr.rec.name} continues alone on node {self.node.name}; "
                              "the sender's copy is stale", str(Err.EIO))
        if isinstance(dmsg, dm.WriteBatch):
            return self.partner_apply.on_writes(pr, peer, dmsg, payload)
        if isinstance(dmsg, dm.Write):
            return self.partner_apply.on_write(pr, peer, dmsg, payload)
        if isinstance(dmsg, dm.Copy):
            return self.partner_apply.on_copy(pr, peer, dmsg, payload)
        if isinstance(dmsg, dm.ForwardBatch):
            return w.on_forwarded_batch(pr, dmsg, payload)
        if isinstance(dmsg, dm.Forward):
            return w.on_forwarded(pr, dmsg.cmd, dmsg.off, dmsg.length, dmsg.flags, payload)
        return self.partner_apply.on_flush(pr)

    def _on_control(self, peer: str, msg: Control, payload: Payload
                    ) -> Message | Awaitable[Message]:
        if isinstance(msg, LeaseRequest):
            return self.leases.on_request(peer, msg)
        if isinstance(msg, PairPrepare):
            return self._prepare(peer, msg)
        pr = self.pairs.get(msg.pair)
        if pr is None:
            raise RemoteError(f"no pair {msg.pair!r} on node {self.node.name}", "not_found")
        if isinstance(msg, PairStateMsg):
            return self.partners.on_pair_state(pr, msg, payload)
        if isinstance(msg, PairDone):
            return self.copier.on_done(pr, msg)
        if isinstance(msg, HashRequest):
            return self.verifier.on_hash(pr, msg)
        if isinstance(msg, DataMapRequest):
            return self.verifier.on_data_map(pr, msg)
        if isinstance(msg, PairSplit):
            self.set_mode(pr, "block", "pair split: the primary continues alone")
            self.set_state(pr, "split", "split by operator")
        elif isinstance(msg, PairDelete):
            self.commands.dissolve(pr)
        elif isinstance(msg, PairYield):
            # The operator chose the partner's data: stop serving and hand over our bitmap.
            self.set_mode(pr, "block", "resync from the partner chosen by the operator")
            self.set_state(pr, "suspended", "being resynced from the partner")
            pr.rec.role = Role.SECONDARY
            self.save(pr)
            return {}, bytes(pr.dirty.bits)
        elif isinstance(msg, PairBlock):
            self.set_mode(pr, "block", msg.reason)
        elif isinstance(msg, PairUnblock):
            if pr.rec.state == "mirrored":
                self.set_mode(pr, "mirror")
        else:  # PairSwap: we take the sender's role
            pr.rec.role = Role(msg.role)
            self.save(pr)
        return {}, b""


    def get(self, name: str) -> PairRuntime:
        pr = self.pairs.get(name)
        if pr is None:
            raise VolumeError(f"pair {name!r} does not exist on node {self.node.name}",
                              "not_found")
        return pr

    async def swap(self, name: str) -> PairRecord:
        return await self.commands.swap(name)

    def view(self, pr: PairRuntime) -> dict[str, Any]:
        rec = pr.rec
        out: dict[str, Any] = {
            "name": rec.name, "mode": rec.mode, "node": self.node.name, "role": rec.role,
            "volume": rec.volume, "partner": rec.partner, "partner_volume": rec.partner_volume,
            "state": rec.state, "io_mode": rec.io_mode, "reason": rec.reason,
            "generation": {"current": rec.gen_current, "history": rec.gen_history},
            "peer_link": "up" if self.peers.is_up(rec.partner) else "down",
            "dirty_chunks": pr.dirty.count(), "chunk_size": CHUNK,
            "export_name": pr.vol.record.export_name, "copy_rate": rec.copy_rate,
        }
        running = pr.copy_task is not None and not pr.copy_task.done()
        if pr.verify:
            out["verify"] = pr.verify
        if rec.remote:
            out["remote_copy"] = rc = self.remote.view(pr)
            if rc.get("served_at"):
                out["role"] = Role.PRIMARY  # a far copy taken over serves hosts: its primary
        out["copy"] = {"running": running, "source": rec.copy_source,
                       "cursor": rec.copy_cursor, "remaining_chunks": pr.dirty.count(),
                       "total_chunks": rec.copy_total, "bytes_sent": pr.copied_bytes}
        return out

    # ---- activity log upkeep -------------------------------------------------------------

