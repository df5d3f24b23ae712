"""Operator commands on an active-active pair: split, resync (optionally from a chosen
side), swap, delete. Each checks first that it makes sense for the pair's state and
refuses with the reason otherwise; a side that will write alone fences its partner
first."""

from __future__ import annotations

import contextlib
import os

from twinvol.replication.core.types import Role
from twinvol.replication.leases import Leases
from twinvol.replication.messages import PairDelete, PairSplit, PairSwap, PairYield, encode
from twinvol.replication.pairs import PairRecord, fork_generation
from twinvol.replication.peer import PeerDown, RemoteError
from twinvol.replication.ports import ManagerPort, SidesPort
from twinvol.replication.runtime import PairRuntime
from twinvol.storage.volumes import VolumeError


class PairCommands:
    def __init__(self, mgr: ManagerPort, leases: Leases, remote: SidesPort) -> None:
        self.mgr = mgr
        self.leases = leases
        self.remote = remote  # an async pair has more sides than its partner

    async def split(self, name: str) -> PairRecord:
        pr = self.mgr.get(name)
        rec = pr.rec
        if rec.role != "primary":
            raise VolumeError(f"run split on the primary ({rec.partner})")
        if rec.state != "mirrored":
            raise VolumeError(f"pair {name!r} is {rec.state}, not mirrored")
        link = self.mgr.link_or_none(rec.partner)
        if link is not None:
            await link.request(encode(PairSplit(name)))
            pr.lease.revoke()  # the partner confirmed it stopped serving
        else:
            await self.leases.fence_partner(pr)
        fork_generation(rec)
        self.mgr.set_mode(pr, "local", "split by operator")
        self.mgr.set_state(pr, "split", "split by operator")
        return rec

    async def resync(self, name: str, source: str | None = None) -> PairRecord:
        """Copy what differs to the partner. `source` (this node) forces the direction,
        discarding the partner's own changes: how an operator resolves a split brain or
        rolls a split pair back to the secondary's data."""
        pr = self.mgr.get(name)
        rec = pr.rec
        if source is not None and source != self.mgr.node.name:
            raise VolumeError(f"run resync --from {source} on node {source}")
        if source is None and rec.role != "primary":
            raise VolumeError(f"run resync on the primary ({rec.partner})")
        if rec.state == "mirrored":
            return rec
        link = self.mgr.link_or_none(rec.partner)
        if link is None:
            raise VolumeError(f"node {rec.partner} is not connected", "io")
        if source is not None:
            # Everything either side changed since they diverged must come from here.
            _, peer_bits = await link.request(
                encode(PairYield(name)), b"")
            pr.dirty.merge(peer_bits)
            await pr.dirty.sync(self.mgr.node.executor)
            pr.lease.revoke()  # the partner confirmed it stopped serving
            if rec.role != "primary":
                rec.role = Role.PRIMARY
                self.mgr.node.events.publish("pair_takeover", pair=name, reason="resync --from")
            self.mgr.set_mode(pr, "local", "resync source chosen by the operator")
            self.mgr.set_state(pr, "suspended", "resync from this copy")
        self.mgr.start_copy(pr)
        return rec

    async def swap(self, name: str) -> PairRecord:
        pr = self.mgr.get(name)
        rec = pr.rec
        if rec.remote:
            raise VolumeError(f"pair {name!r} is a remote copy ({rec.mode}): swap exchanges "
                              "the roles of an active-active pair; a remote copy changes "
                              "direction with `twinvol dr takeover` and `twinvol dr failback`")
        if rec.state != "mirrored":
            raise VolumeError(f"pair {name!r} is {rec.state}; swap needs mirrored")
        link = self.mgr.link_or_none(rec.partner)
        if link is None:
            raise VolumeError(f"node {rec.partner} is not connected", "io")
        await link.request(encode(PairSwap(name, "primary" if rec.role == "primary"
                                           else "secondary")))
        rec.role = Role.SECONDARY if rec.role == Role.PRIMARY else Role.PRIMARY
        self.mgr.save(pr)
        self.mgr.node.events.publish("pair_swapped", pair=name, role=rec.role)
        return rec

    async def delete(self, name: str) -> None:
        pr = self.mgr.get(name)
        others = [pr.rec.partner]
        if pr.rec.remote:
            others += self.remote.other_sides(pr)
        for other in others:
            link = self.mgr.link_or_none(other)
            if link is not None:
                with contextlib.suppress(PeerDown, RemoteError):
                    await link.request(encode(PairDelete(name)))
        self.dissolve(pr)

    def dissolve(self, pr: PairRuntime) -> None:
        rec = pr.rec
        if pr.copy_task is not None:
            pr.copy_task.cancel()
        if rec.own_identity:
            own = rec.own_identity
            export = str(own["export_name"])
            if export.startswith(".pairing-"):
                export = rec.volume
            with contextlib.suppress(VolumeError):
                self.mgr.node.volumes.set_identity(
                    rec.volume, serial=str(own["serial"]), vvol_id=int(str(own["vvol_id"])),
                    export_name=export, description=str(own["description"]))
        self.mgr.store.delete(rec.name)
        del self.mgr.pairs[rec.name]
        owned = self.mgr.by_volume.get(rec.volume) is pr
        if owned:
            del self.mgr.by_volume[rec.volume]
        if rec.remote:
            self.remote.detach(pr)
            # The volume's own pair (if any) takes it back.
            for other in self.mgr.pairs.values():
                if other.rec.volume == rec.volume and rec.volume not in self.mgr.by_volume:
                    self.mgr.by_volume[rec.volume] = other
        pr.dirty.close()
        pr.al.close()
        for suffix in (".dirty", ".al"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.mgr.bitmap_dir, rec.name + suffix))
        self.mgr.node.events.publish("pair_deleted", pair=rec.name)
        if not owned or rec.volume in self.mgr.by_volume:
            return  # another pair still governs the volume's I/O
        self.mgr.node.set_io_mode(rec.volume, "local", "pair deleted")
        # Open connections were bound to the pair's write path: make clients reconnect.
        self.mgr.node.drop_clients(rec.volume)
