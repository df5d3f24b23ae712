"""The switching table: host-side volume id -> storage-side volume, persistent and shared.

Identifications:
- the **host-side id** is the export name the host addresses (for an active-active
  volume, the shared virtual identity's export name, the same on both nodes);
- the **storage-side id** is `NODE:VOLUME`, one real volume;
- a switch command names its target as `NODE:VOLUME`, as `VOLUME` (a partner volume
  name, when only one partner has it), or as the volume's stable id (`volume show`).

The node that receives a switch command finds the target among the pair partners of
its volume behind the host-side id (local copies, the active-active partner, remote
copies), refuses one whose pair state makes it unsafe, and records the entry on every
node that serves the host (the host agent's nodes, the volume's active-active partners,
the target's node) — all of them or none. From then on the target's node serves the
export's open connections and new ones from the target (`rebind`: in-flight requests
finish on the source first), and the other nodes refuse the export to hosts, so a host
agent moves its I/O to the target's node without an error reaching the client.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec

from twinvol import clock
from twinvol.cluster import ClusterError
from twinvol.replication.core.types import PairState
from twinvol.replication.ports import NodePort
from twinvol.storage.records import RecordTable
from twinvol.storage.volumes import Volume, VolumeError
from twinvol.tls.context import api_contexts

if TYPE_CHECKING:
    from twinvol.nbd.aio import Backend, NbdServerProtocol
    from twinvol.replication.manager import ReplicationManager


class SwitchingNode(NodePort, Protocol):
    """What the switching table needs of its node (node/node.py's Node): what
    replication needs, plus the pairs and the connections of an export."""

    @property
    def replication(self) -> ReplicationManager: ...

    def export_connections(self, name: str) -> list[NbdServerProtocol]: ...


log = logging.getLogger("twinvol.switching")

NODE_CALL_TIMEOUT = 20.0
DRAIN_TIMEOUT = 10.0



class SwitchEntry(msgspec.Struct):
    """One row of the switching table (the same on every node that holds it)."""

    host_id: str            # export name the host addresses
    source_node: str
    source_volume: str
    target_node: str
    target_volume: str
    pair: str               # the pair that makes the target a partner of the source
    mode: str               # that pair's mode: local | active-active | async | sync
    nodes: list[str]        # every node holding this entry
    version: int            # changes with every switch (compare-and-set between nodes)
    switched_at: float
    origin: str             # node that ran the command

    @property
    def target(self) -> str:
        return f"{self.target_node}:{self.target_volume}"

    @property
    def source(self) -> str:
        return f"{self.source_node}:{self.source_volume}"


@dataclass(frozen=True)
class Partner:
    """A pair partner of a source volume, as the switch decision sees it."""

    node: str
    volume: str
    volume_id: str      # stable id (local volumes only; "" otherwise)
    pair: str
    mode: str
    state: str
    link_up: bool = True


# ---- the decision (pure) ---------------------------------------------------------------


def choose_target(source: str, partners: list[Partner], target_id: str,
                  host_nodes: list[str]) -> Partner:
    """The partner `target_id` names, if switching the host to it is safe; otherwise
    VolumeError with one line naming what is wrong. `source` is `NODE:VOLUME`."""
    target_id = target_id.strip()
    if not target_id:
        raise VolumeError("the target identification is empty: use NODE:VOLUME, VOLUME or a "
                          "volume id")
    listed = ", ".join(f"{p.node}:{p.volume} ({p.mode} pair {p.pair})" for p in partners) \
        or "none"
    if target_id == source:
        raise VolumeError(f"{target_id} is the source volume itself; nothing to switch",
                          "not_found")
    node, sep, vol = target_id.partition(":")
    if sep:
        found = [p for p in partners if p.node == node and p.volume == vol]
    else:
        found = [p for p in partners if p.volume == target_id or p.volume_id == target_id]
    if not found:
        raise VolumeError(f"{target_id} is not a pair partner of {source} (its partners: "
                          f"{listed})", "not_found")
    if len(found) > 1:
        raise VolumeError(f"{target_id} names several partners of {source} ("
                          + ", ".join(f"{p.node}:{p.volume}" for p in found)
                          + "); use NODE:VOLUME")
    p = found[0]
    where = f"{p.node}:{p.volume}"
    if p.mode == "local":
        if p.state == "copying":
            raise VolumeError(f"local pair {p.pair!r} is copying: {where} is not a consistent "
                              "copy until the pair is mirrored or split", "conflict")
        if p.state not in ("mirrored", "split"):
            raise VolumeError(f"local pair {p.pair!r} is {p.state}: {where} may be incomplete",
                              "conflict")
    elif p.mode == "active-active":
        if p.state != "mirrored" or not p.link_up:
            state = p.state if p.link_up else f"{p.state} with its peer link down"
            raise VolumeError(f"active-active pair {p.pair!r} is {state}: {where} may be stale; "
                              "switch when the pair is mirrored", "conflict")
    elif p.state != "takeover":
        raise VolumeError(f"{p.mode} pair {p.pair!r} is {p.state}: the far copy {where} serves "
                          f"no host before `twinvol dr takeover --site` of its site", "conflict")
    if p.node != source.partition(":")[0] and p.node not in host_nodes:
        raise VolumeError(f"node {p.node} does not serve this host (its nodes: "
                          f"{', '.join(host_nodes)}); it cannot take the host's I/O",
                          "conflict")
    return p


def away_reason(e: SwitchEntry) -> str:
    return (f"export {e.host_id!r} is switched to {e.target} (switching table); use node "
            f"{e.target_node}")


# ---- the node's table ------------------------------------------------------------------


class Switching:
    """The switching table of one node and what it does to host I/O here."""

    def __init__(self, node: SwitchingNode) -> None:
        self.node = node
        self.rows = RecordTable(node.volumes.catalog.db, "switching", SwitchEntry,
                                 key="host_id")
        self.entries: dict[str, SwitchEntry] = {}
        self.busy: set[str] = set()     # host ids with a switch in progress here
        self._http: aiohttp.ClientSession | None = None
        for e in self.rows.all():
            self.entries[e.host_id] = e
            # Before the NBD server starts: no host may reach a switched-away copy.
            vol = node.volumes.by_export(e.host_id)
            if e.target_node != node.name and vol is not None:
                node.replication.hold(vol.record.name, away_reason(e))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()

    # ---- what I/O uses ----------------------------------------------------------------

    def backend(self, host_id: str) -> Backend | None:
        """The backend of connections to `host_id` when it is switched to a volume here."""
        e = self.entries.get(host_id)
        if e is None or e.target_node != self.node.name:
            return None
        vols = self.node.volumes
        tv = vols.volumes.get(e.target_volume)
        if tv is None:
            log.error("switching target missing", extra={"export": host_id,
                                                        "target": e.target})
            return None
        if vols.by_export(host_id) is tv:
            return None
        local = self.node.replication.local
        lp = local.by_volume.get(tv.record.name)
        if lp is not None and lp.rec.secondary == tv.record.name:
            from twinvol.replication.local import LocalTargetBackend

            return LocalTargetBackend(local, lp)
        return self.node.volume_backend(tv)

    def involving(self, volume: str) -> list[SwitchEntry]:
        me = self.node.name
        return [e for e in self.entries.values()
                if (e.source_node == me and e.source_volume == volume)
                or (e.target_node == me and e.target_volume == volume)]

    def check_free(self, volume: str, action: str) -> None:
        for e in self.involving(volume):
            raise VolumeError(f"export {e.host_id!r} is switched from {e.source} to "
                              f"{e.target}; run `twinvol switch {e.host_id} --back` before you "
                              f"{action}", "conflict")

    async def barrier(self, volume: str) -> None:
        """Let requests in flight on connections switched to `volume` complete."""
        from twinvol.nbd.aio_group import rebind

        for e in self.involving(volume):
            if e.target_node == self.node.name and e.target_volume == volume:
                await rebind(self.node.export_connections(e.host_id), None, DRAIN_TIMEOUT)

    def view(self, e: SwitchEntry) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(e)
        out["source"], out["target"] = e.source, e.target
        me = self.node.name
        out["here"] = "serves the target" if e.target_node == me else \
            "refuses the export to hosts" if self.node.volumes.by_export(e.host_id) else "holds"
        return out

    def table(self) -> list[dict[str, Any]]:
        return [self.view(e) for e in sorted(self.entries.values(), key=lambda e: e.host_id)]

    # ---- partners ---------------------------------------------------------------------

    def partners(self, vol: Volume) -> list[Partner]:
        mgr, me, name = self.node.replication, self.node.name, vol.record.name
        out: list[Partner] = []
        lp = mgr.local.by_volume.get(name)
        if lp is not None:
            other = lp.rec.secondary if name == lp.rec.primary else lp.rec.primary
            ov = self.node.volumes.volumes.get(other)
            out.append(Partner(me, other, ov.record.id if ov else "", lp.rec.name, "local",
                               lp.rec.state))
        for pr in mgr.pairs.values():
            if pr.rec.volume == name:
                state = pr.rec.state
                g = mgr.remote.groups.get(pr.rec.group) if pr.rec.remote else None
                if g is not None and g.rec.hold:
                    state = PairState.TAKEOVER   # the far copy serves hosts (DR takeover there)
                out.append(Partner(pr.rec.partner, pr.rec.partner_volume, "", pr.rec.name,
                                   pr.rec.mode, state, mgr.peers.is_up(pr.rec.partner)))
        return out

    # ---- commands (this node coordinates) ---------------------------------------------

    def _lock(self, host_id: str) -> None:
        if host_id in self.busy:
            raise VolumeError(f"a switch of export {host_id!r} is already in progress on node "
                              f"{self.node.name}; try again when it has finished", "busy")
        self.busy.add(host_id)

    async def switch(self, host_id: str, target_id: str, host_nodes: list[str]) -> SwitchEntry:
        me = self.node.name
        vol = self.node.volumes.by_export(host_id)
        if vol is None:
            raise VolumeError(f"export {host_id!r} does not exist on node {me}", "not_found")
        for n in host_nodes:
            try:
                self.node.cluster.node(n)
            except ClusterError as e:
                raise VolumeError(str(e)) from None
        self._lock(host_id)
        try:
            cur = self.entries.get(host_id)
            if cur is not None:
                raise VolumeError(f"export {host_id!r} is already switched to {cur.target}; "
                                  f"run `twinvol switch {host_id} --back` first", "conflict")
            source = f"{me}:{vol.record.name}"
            p = choose_target(source, self.partners(vol), target_id, host_nodes or [me])
            twins = [pr.rec.partner for pr in self.node.replication.pairs.values()
                     if pr.rec.volume == vol.record.name and pr.rec.mode == "active-active"]
            nodes = sorted({me, p.node, *host_nodes, *twins})
            entry = SwitchEntry(host_id=host_id, source_node=me, source_volume=vol.record.name,
                                target_node=p.node, target_volume=p.volume, pair=p.pair,
                                mode=p.mode, nodes=nodes, version=time.time_ns(),
                                switched_at=clock.wall(), origin=me)
            # Nodes that stop serving the export first, the target's node last.
            order = sorted(nodes, key=lambda n: n == entry.target_node)
            await self._everywhere(host_id, order, None, entry)
        finally:
            self.busy.discard(host_id)
        log.info("export switched", extra={"export": host_id, "source": entry.source,
                                           "target": entry.target, "nodes": nodes})
        return entry

    async def back(self, host_id: str) -> SwitchEntry:
        me = self.node.name
        self._lock(host_id)
        try:
            cur = self.entries.get(host_id)
            if cur is None:
                raise VolumeError(f"export {host_id!r} is not switched on node {me}",
                                  "not_found")
            # The target's node gives the export back first, then the others serve again.
            order = sorted(cur.nodes, key=lambda n: n != cur.target_node)
            await self._everywhere(host_id, order, cur, None)
        finally:
            self.busy.discard(host_id)
        log.info("export switched back", extra={"export": host_id, "source": cur.source,
                                                "target": cur.target})
        return cur

    async def _everywhere(self, host_id: str, order: list[str], old: SwitchEntry | None,
                          new: SwitchEntry | None) -> None:
        """Apply old -> new on every node in order; on any refusal undo what was done."""
        expect = 0 if old is None else old.version
        done: list[str] = []
        try:
            for n in order:
                await self._apply_at(n, host_id, new, expect)
                done.append(n)
        except VolumeError as e:
            back = 0 if new is None else new.version
            for n in reversed(done):
                try:
                    await self._apply_at(n, host_id, old, back)
                except VolumeError as undo:
                    log.error("switching table undo failed", extra={"node": n,
                                                                     "error": str(undo)})
            raise VolumeError(f"switch refused, the table is unchanged: {e}", e.code) from None

    async def _apply_at(self, node: str, host_id: str, entry: SwitchEntry | None,
                        expect: int) -> None:
        if node == self.node.name:
            await self._apply(host_id, entry, expect)
            return
        cfg = self.node.cluster.node(node)
        secret = self.node.cluster.cluster.secret
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        body = {"host_id": host_id, "expect": expect,
                "entry": None if entry is None else msgspec.to_builtins(entry)}
        if self._http is None:
            ssl_ctx = api_contexts(self.node.cluster, self.node.name)[1]
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)
                                               if ssl_ctx else None)
        try:
            async with self._http.post(cfg.api_url + "/api/v1/switching/apply", json=body,
                                       headers=headers,
                                       timeout=aiohttp.ClientTimeout(NODE_CALL_TIMEOUT)) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    err = answer.get("error", {}) if isinstance(answer, dict) else {}
                    raise VolumeError(f"node {node}: {err.get('message', f'HTTP {r.status}')}",
                                      str(err.get("code", "io")))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise VolumeError(f"node {node}, which serves this host, is not reachable "
                              f"({e or type(e).__name__}); every such node must hold the "
                              "switching table", "io") from None

    # ---- applying an entry here -------------------------------------------------------

    async def apply_remote(self, host_id: str, entry: SwitchEntry | None, expect: int) -> None:
        """Another node coordinates a switch: apply it here (compare-and-set on version)."""
        self._lock(host_id)
        try:
            await self._apply(host_id, entry, expect)
        finally:
            self.busy.discard(host_id)

    async def _apply(self, host_id: str, entry: SwitchEntry | None, expect: int) -> None:
        me = self.node.name
        old = self.entries.get(host_id)
        if (0 if old is None else old.version) != expect:
            now = "no entry" if old is None else f"switched to {old.target}"
            raise VolumeError(f"the switching table of node {me} changed meanwhile (export "
                              f"{host_id!r}: {now})", "conflict")
        self._store(host_id, entry)
        try:
            await self._effect(host_id, old, entry)
        except BaseException:
            self._store(host_id, old)
            with contextlib.suppress(Exception):
                await self._effect(host_id, entry, old)
            raise
        if entry is not None:
            self.node.events.publish("switched", export=host_id, source=entry.source,
                                     target=entry.target, version=entry.version,
                                     nodes=entry.nodes)
        elif old is not None:
            self.node.events.publish("switched_back", export=host_id, source=old.source,
                                     target=old.target, version=old.version)

    def _store(self, host_id: str, entry: SwitchEntry | None) -> None:
        if entry is None:
            self.rows.delete(host_id)
            self.entries.pop(host_id, None)
        else:
            self.rows.save(host_id, entry)
            self.entries[host_id] = entry

    async def _effect(self, host_id: str, old: SwitchEntry | None,
                      new: SwitchEntry | None) -> None:
        """Make host I/O here follow the table: refuse the export, or serve the target."""
        from twinvol.nbd.aio_group import DrainTimeout

        me, mgr = self.node.name, self.node.replication
        vol = self.node.volumes.by_export(host_id)
        if new is not None and new.target_node == me \
                and new.target_volume not in self.node.volumes.volumes:
            raise VolumeError(f"volume {new.target_volume!r} does not exist on node {me}",
                              "not_found")
        if vol is None:
            return
        name = vol.record.name
        was_away = old is not None and old.target_node != me
        is_away = new is not None and new.target_node != me
        if is_away and not was_away:
            assert new is not None
            mgr.hold(name, away_reason(new))
        elif was_away and not is_away:
            assert old is not None
            if mgr.holds.get(name) == away_reason(old):
                mgr.unhold(name)
        if (old is not None and old.target_node == me) or (new is not None
                                                           and new.target_node == me):
            try:
                await self.node.rebind_export(host_id, DRAIN_TIMEOUT)
            except DrainTimeout as e:
                raise VolumeError(f"node {me}: export {host_id!r}: {e}; nothing was switched",
                                  "busy") from None
