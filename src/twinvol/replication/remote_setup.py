"""Creating a remote copy, on its primary: the far site prepares a blocked copy with the
same identity, the active-active partner (if any) becomes the standby of the group, and
the initial copy and the shipping of records start."""

from __future__ import annotations

from twinvol.replication import remote_messages as rm
from twinvol.replication.bitmap import nchunks
from twinvol.replication.core.types import GroupRole, GroupState, Mode, PairState, Role
from twinvol.replication.pairs import PairRecord, new_generation
from twinvol.replication.peer import PeerDown, RemoteError
from twinvol.replication.ports import RemotePort
from twinvol.replication.runtime import GroupRecord
from twinvol.storage.volumes import VolumeError


class RemoteSetup:
    """`pair create --mode async|sync` on the primary."""

    def __init__(self, remote: RemotePort) -> None:
        self.remote = remote
        self.mgr = remote.mgr
        self.node = remote.node

    async def create(self, name: str, volume: str, target: str, target_volume: str,
                     group: str, journal_limit: int, sync: bool = False) -> PairRecord:
        mgr = self.mgr
        mode = "sync" if sync else "async"
        vol = self.node.volumes.get(volume)
        aa = mgr.by_volume.get(vol.record.name)
        if sync and aa is not None:
            raise VolumeError(f"volume {volume!r} is in pair {aa.rec.name!r}: a sync remote "
                              "copy needs a volume of its own (use --mode async)")
        if aa is not None and aa.rec.mode != "active-active":
            raise VolumeError(f"volume {volume!r} is already in pair {aa.rec.name!r}",
                              "conflict")
        fed = self.remote.feeds.get(vol.record.name)
        if fed is not None:
            raise VolumeError(f"volume {volume!r} already has a remote copy "
                              f"(group {fed.rec.name!r})", "conflict")
        if aa is not None and aa.rec.role != "primary":
            raise VolumeError(f"volume {volume!r} is the secondary of active-active pair "
                              f"{aa.rec.name!r}: create the remote copy on its primary "
                              f"({aa.rec.partner})")
        if aa is not None and target == aa.rec.partner:
            raise VolumeError(f"node {target} already holds the active-active copy")
        g = self.remote.groups.get(group)
        if g is not None and g.rec.sync != sync:
            raise VolumeError(f"consistency group {group!r} is "
                              f"{'sync' if g.rec.sync else 'async'}; its pairs share one mode",
                              "conflict")
        if g is not None and (g.rec.role != "primary" or g.rec.target != target):
            raise VolumeError(f"consistency group {group!r} is {g.rec.role} towards "
                              f"{g.rec.target} on this node; its volumes must share one "
                              "primary and one target", "conflict")
        link = mgr.peers.link(target) if mgr.peers.is_up(target) else None
        if link is None:
            raise VolumeError(f"node {target} is not connected (peer link down)", "io")
        r = vol.record
        gen = new_generation()
        limit = g.rec.journal_limit if g is not None else journal_limit
        try:
            await link.request(rm.encode(rm.TargetPrepare(
                group=group, pair=name, volume=target_volume, partner_volume=r.name, size=r.size,
                serial=r.serial, vvol_id=r.vvol_id, export_name=r.export_name,
                description=r.description, gen=gen, journal_limit=limit, mode=mode)))
            if aa is not None:
                plink = mgr.peers.link(aa.rec.partner)
                await plink.request(rm.encode(rm.StandbyPrepare(
                    group, pair=name, volume=aa.rec.partner_volume, target=target,
                    target_volume=target_volume, journal_limit=limit, gen=gen,
                    written=g.rec.written if g else 0)))
        except RemoteError as e:
            raise VolumeError(f"{e}", e.code if e.code in (
                "invalid", "not_found", "conflict", "busy") else "io") from None
        except PeerDown as e:
            raise VolumeError(f"a node went away while pairing: {e}", "io") from None
        if g is None:
            g = self.remote.open_group(GroupRecord(
                name=group, role=GroupRole.PRIMARY, target=target, feeder=self.node.name,
                origin=self.node.name, journal_limit=limit, sync=sync))
        g.rec.state = GroupState.COPYING
        self.remote.save(g)
        prec = PairRecord(name=name, mode=mode, role=Role.PRIMARY, volume=r.name,
                          partner=target, partner_volume=target_volume, state=PairState.COPYING,
                          io_mode=Mode(vol.io_mode), gen_current=gen, copy_total=nchunks(r.size),
                          copy_source=self.node.name, group=group)
        mgr.store.save(prec)
        pr = mgr.load(prec)
        pr.dirty.set_all()
        await pr.dirty.sync(self.node.executor)
        self.node.events.publish("pair_created", pair=name, role="primary", partner=target,
                                 mode=mode, group=group)
        self.remote.start_shipping(g)
        mgr.start_copy(pr)
        return prec
