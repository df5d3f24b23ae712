"""The node's HTTP JSON management API (aiohttp).

Errors are `{"error": {"code": ..., "message": ...}}` with a matching HTTP status,
so the CLI can print one clear line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from twinvol import __version__, clock
from twinvol.access import TokenError, TokenStore
from twinvol.api_tokens import token_routes
from twinvol.audit import AuditLog
from twinvol.cluster import NODE_HEADER
from twinvol.faults.api import fault_routes
from twinvol.httpapi import access_control, error_response, follow_lines
from twinvol.sizes import SizeError, parse_size
from twinvol.storage.volumes import Volume, VolumeError

if TYPE_CHECKING:
    from twinvol.node.node import Node

_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "busy": 409, "io": 500}


class CreateVolume(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    size: int | str | None = None
    path: str | None = None
    export_name: str | None = None
    description: str = ""
    read_only: bool = False
    serial: str | None = None  # virtual identity override (default: this node's serial)
    volume_id: int | None = None
    adopt: bool = False        # use an existing file or device (its contents are the volume)
    dry_run: bool = False      # only say what would be done


class CreatePair(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    secondary: str
    mode: str = "active-active"
    primary_volume: str | None = None
    secondary_volume: str | None = None
    group: str | None = None                  # async: consistency group (default: the name)
    journal_size: int | str | None = None     # async: journal limit of a new group
    copy_rate: int | str | None = None        # pace of the copies this node feeds, bytes/s


class SetPair(msgspec.Struct, forbid_unknown_fields=True):
    copy_rate: int | str | None = None        # pace of the copies this node feeds (0: none)


class SwitchCommand(msgspec.Struct, forbid_unknown_fields=True):
    host_id: str                      # the export name the host addresses
    to: str = ""                      # target: NODE:VOLUME, VOLUME or a volume id
    nodes: list[str] | None = None    # nodes that serve the host (default: this node)


class SwitchApply(msgspec.Struct, forbid_unknown_fields=True):
    host_id: str
    expect: int
    entry: dict[str, Any] | None = None


class Takeover(msgspec.Struct, forbid_unknown_fields=True):
    force: bool = False


class ResizeVolume(msgspec.Struct, forbid_unknown_fields=True):
    size: int | str


error = error_response


def _size(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except SizeError as e:
        raise VolumeError(str(e)) from None


def _rate(value: int | str | None) -> int:
    rate = _size(value) or 0
    if rate < 0 or 0 < rate < 65536:
        raise VolumeError(f"copy_rate must be 0 (unlimited) or at least 64K per second, "
                          f"not {value!r}")
    return rate


async def _body(request: web.Request, kind: type[Any]) -> Any:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.DecodeError as e:
        raise VolumeError(f"bad request body: {e}") from None


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except VolumeError as e:
        return error(_STATUS.get(e.code, 400), e.code, str(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return error(e.status, "http", e.reason)
        raise
    except Exception as e:  # a bug: still the documented JSON error, and logged in full
        logging.getLogger("twinvol.api").exception("request %s %s failed", request.method,
                                                   request.path)
        return error(500, "internal", f"internal error: {type(e).__name__}: {e} (the node "
                     "log has the details)")


def volume_view(node: Node, vol: Volume) -> dict[str, Any]:
    rec = vol.record
    out: dict[str, Any] = msgspec.to_builtins(rec)
    out["node"] = node.name
    out["site"] = node.config.site
    out["connections"] = vol.connections
    out["nbd_uri"] = node.config.nbd_uri(rec.export_name)
    try:
        out["allocated"] = os.stat(rec.path).st_blocks * 512 if rec.kind != "device" else rec.size
    except OSError:
        out["allocated"] = None
    out["virtual_identity"] = identity(rec)
    out["io_mode"] = vol.io_mode
    return out


def identity(rec: Any) -> dict[str, Any]:
    """What a host compares before using two paths together as one device."""
    return {"serial": rec.serial, "volume_id": rec.vvol_id, "export_name": rec.export_name,
            "size": rec.size, "description": rec.description}


def make_app(node: Node) -> web.Application:
    section = node.cluster.cluster
    try:
        store = TokenStore(os.path.join(node.data_dir, "tokens.json"))
    except TokenError as e:
        from twinvol.node.node import NodeStartError
        raise NodeStartError(str(e)) from None
    audit = AuditLog(os.path.join(node.data_dir, "audit.log"))
    app = web.Application(middlewares=[access_control(section.secret, store, audit=audit,
                                                      metrics_open=section.metrics_open),
                                       errors], client_max_size=1 << 20)
    routes = web.RouteTableDef()

    async def say_who(_: web.Request, resp: web.StreamResponse) -> None:
        # Every answer names its node, so a client that reached the wrong one (two nodes on
        # one address, a stale cluster file) can tell instead of trusting the answer.
        resp.headers[NODE_HEADER] = node.name

    app.on_response_prepare.append(say_who)

    @routes.get("/api/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": node.name})

    @routes.get("/api/v1/node")
    async def status(_: web.Request) -> web.Response:
        st = os.statvfs(node.data_dir)
        return web.json_response({
            "node": node.name,
            "site": node.config.site,
            "pid": os.getpid(),
            "version": __version__,
            "serial": node.volumes.serial,
            "uptime": round(clock.monotonic() - node.started, 3),
            "nbd": node.config.nbd_uri(),
            "api": node.config.api_url,
            "data_dir": node.data_dir,
            "volumes": len(node.volumes.volumes),
            "connections": len(node.connections),
            "capacity": {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize},
        })

    @routes.get("/api/v1/volumes")
    async def list_volumes(_: web.Request) -> web.Response:
        vols = [volume_view(node, v) for v in node.volumes.volumes.values()]
        return web.json_response({"volumes": vols})

    @routes.post("/api/v1/volumes")
    async def create_volume(request: web.Request) -> web.Response:
        body: CreateVolume = await _body(request, CreateVolume)
        plan = node.volumes.plan(body.name, _size(body.size), path=body.path,
                                 export_name=body.export_name, serial=body.serial,
                                 vvol_id=body.volume_id, adopt=body.adopt)
        if body.dry_run:
            return web.json_response({"dry_run": True, "name": plan.name, "node": node.name,
                                      "export_name": plan.export_name, "kind": plan.kind,
                                      "size": plan.size, "path": plan.path,
                                      "action": plan.step.action, "says": plan.step.says})
        vol = node.volumes.create(body.name, _size(body.size), path=body.path,
                                  export_name=body.export_name, description=body.description,
                                  read_only=body.read_only, serial=body.serial,
                                  vvol_id=body.volume_id, adopt=body.adopt)
        node.events.publish("volume_created", volume=vol.record.name,
                            export=vol.record.export_name)
        node.log.info("volume created", extra={"volume": vol.record.name,
                                               "size": vol.record.size, "path": vol.record.path,
                                               "action": plan.step.action})
        return web.json_response({**volume_view(node, vol), "action": plan.step.action,
                                  "says": plan.step.says}, status=201)

    @routes.get("/api/v1/volumes/{name}")
    async def show_volume(request: web.Request) -> web.Response:
        return web.json_response(volume_view(node, node.volumes.get(request.match_info["name"])))

    @routes.post("/api/v1/volumes/{name}/resize")
    async def resize_volume(request: web.Request) -> web.Response:
        body: ResizeVolume = await _body(request, ResizeVolume)
        size = _size(body.size)
        assert size is not None
        node.check_unpaired(request.match_info["name"], "resize")
        vol = node.volumes.resize(request.match_info["name"], size)
        node.log.info("volume resized", extra={"volume": vol.record.name, "size": size})
        return web.json_response(volume_view(node, vol))

    @routes.delete("/api/v1/volumes/{name}")
    async def delete_volume(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        force = request.query.get("force", "") in ("1", "true", "yes")
        rec = node.delete_volume(name, force=force)
        return web.json_response({"deleted": rec.name, "id": rec.id})

    local = node.replication.local

    def pair_view(name: str) -> dict[str, Any]:
        """Any pair's view (local copies included), with the switching entries of its
        volumes on this node."""
        mgr = node.replication
        view = local.view(local.pairs[name]) if name in local.pairs else mgr.view(mgr.get(name))
        vols = {view["volume"]} | ({view["partner_volume"]} if view["mode"] == "local"
                                   else set())
        entries = {e.host_id: e for v in sorted(vols) for e in node.switching.involving(v)}
        view["switching"] = [node.switching.view(e) for e in entries.values()]
        return view

    @routes.get("/api/v1/pairs")
    async def list_pairs(_: web.Request) -> web.Response:
        names = [*node.replication.pairs, *local.pairs]
        return web.json_response({"pairs": [pair_view(n) for n in sorted(names)]})

    @routes.post("/api/v1/pairs")
    async def create_pair(request: web.Request) -> web.Response:
        body: CreatePair = await _body(request, CreatePair)
        if body.mode == "local":
            if body.secondary != node.name:
                raise VolumeError(f"a local pair's secondary is on this node ({node.name}), "
                                  f"not {body.secondary}")
            lp = await local.create(body.name, body.primary_volume or body.name,
                                    body.secondary_volume or body.name,
                                    _rate(body.copy_rate))
            return web.json_response(pair_view(lp.rec.name), status=201)
        if body.name in local.pairs:
            raise VolumeError(f"pair {body.name!r} already exists", "conflict")
        pvol = body.primary_volume or body.name
        if pvol in local.by_volume and local.by_volume[pvol].rec.secondary == pvol:
            raise VolumeError(f"volume {pvol!r} is the secondary of local pair "
                              f"{local.by_volume[pvol].rec.name!r}", "conflict")
        if body.mode not in ("active-active", "async", "sync"):
            raise VolumeError(f"pair mode {body.mode!r} is not supported (active-active, "
                              "async, sync, local)")
        if body.mode not in ("async", "sync") and (body.group or body.journal_size):
            raise VolumeError("group and journal_size apply to async and sync pairs only")
        journal = _size(body.journal_size) or 0
        if body.journal_size is not None and journal < 1024 * 1024:
            raise VolumeError("journal_size must be at least 1M")
        rate = _rate(body.copy_rate)
        rec = await node.replication.create(body.name, body.primary_volume or body.name,
                                            body.secondary,
                                            body.secondary_volume or body.name,
                                            mode=body.mode, group=body.group or "",
                                            journal_limit=journal)
        if rate:
            rec.copy_rate = rate   # read live by the copy that create just started
            node.replication.save(node.replication.pairs[rec.name])
        return web.json_response(node.replication.view(node.replication.pairs[rec.name]),
                                 status=201)

    @routes.get("/api/v1/pairs/{name}")
    async def show_pair(request: web.Request) -> web.Response:
        return web.json_response(pair_view(request.match_info["name"]))

    @routes.patch("/api/v1/pairs/{name}")
    async def set_pair(request: web.Request) -> web.Response:
        """Change a pair's settings on this node (a running copy follows at once)."""
        name = request.match_info["name"]
        body: SetPair = await _body(request, SetPair)
        if body.copy_rate is None:
            raise VolumeError("nothing to set: give copy_rate")
        rate = _rate(body.copy_rate)
        if name in local.pairs:
            lp = local.get(name)
            lp.rec.copy_rate = rate
            local.save(lp)
        else:
            pr = node.replication.get(name)
            pr.rec.copy_rate = rate
            node.replication.save(pr)
        return web.json_response(pair_view(name))

    @routes.post("/api/v1/pairs/{name}/{action}")
    async def pair_action(request: web.Request) -> web.Response:
        mgr = node.replication
        name, action = request.match_info["name"], request.match_info["action"]
        if name in local.pairs:
            local_ops = {"split": local.split, "resync": local.resync}
            if action not in local_ops:
                raise VolumeError(f"a local pair supports split and resync, not {action!r}")
            await local_ops[action](name)
            return web.json_response(pair_view(name))
        if action == "verify":
            return web.json_response(mgr.view(mgr.verifier.start(name)))
        if action == "resync":
            await mgr.commands.resync(name, request.query.get("from") or None)
            await asyncio.sleep(0)  # let the copy task start, so the answer shows it running
            return web.json_response(mgr.view(mgr.get(name)))
        ops = {"split": mgr.commands.split, "swap": mgr.commands.swap}
        if action not in ops:
            raise VolumeError(f"unknown pair action {action!r} (split, resync, swap, verify)",
                              "not_found")
        await ops[action](name)
        return web.json_response(mgr.view(mgr.get(name)))

    @routes.delete("/api/v1/pairs/{name}")
    async def delete_pair(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in local.pairs:
            await local.delete(name)
            return web.json_response({"deleted": name})
        node.switching.check_free(node.replication.get(name).rec.volume,
                                  f"delete pair {name!r}")
        await node.replication.commands.delete(name)
        return web.json_response({"deleted": name})

    @routes.post("/api/v1/dr/takeover")
    async def dr_takeover(request: web.Request) -> web.Response:
        """Disaster recovery at this node's site: feed or serve every remote copy here."""
        body: Takeover = await _body(request, Takeover) if request.can_read_body \
            else Takeover()
        groups = await node.replication.remote.dr.takeover(force=body.force)
        return web.json_response({"node": node.name, "site": node.config.site,
                                  "groups": groups})

    @routes.post("/api/v1/dr/failback")
    async def dr_failback(_: web.Request) -> web.Response:
        """At the original primary: copy the far copy's changes back, then feed it again."""
        groups = await node.replication.remote.dr.failback()
        return web.json_response({"node": node.name, "site": node.config.site,
                                  "groups": groups})

    @routes.get("/api/v1/exports/{export}")
    async def show_export(request: web.Request) -> web.Response:
        """Identity and I/O mode of an export, as a host agent checks it."""
        export = request.match_info["export"]
        vol = node.volumes.by_export(export)
        if vol is None:
            raise VolumeError(f"export {export!r} does not exist on node {node.name}",
                              "not_found")
        pr = node.replication.by_volume.get(vol.record.name)
        sw = node.switching.entries.get(export)
        return web.json_response({"node": node.name, "site": node.config.site,
                                  "volume": vol.record.name, "io_mode": vol.io_mode,
                                  "role": None if pr is None else pr.rec.role,
                                  "pair": None if pr is None else pr.rec.name,
                                  "switched": sw and node.switching.view(sw),
                                  "virtual_identity": identity(vol.record)})

    @routes.get("/api/v1/switching")
    async def switching_table(_: web.Request) -> web.Response:
        return web.json_response({"node": node.name, "entries": node.switching.table()})

    @routes.post("/api/v1/switching")
    async def switch(request: web.Request) -> web.Response:
        """A host's switch command: find the target among the partners, record it on every
        node that serves the host, redirect the export's I/O."""
        body: SwitchCommand = await _body(request, SwitchCommand)
        if not body.to:
            raise VolumeError("give the target as `to` (NODE:VOLUME, VOLUME or a volume id)")
        e = await node.switching.switch(body.host_id, body.to, body.nodes or [node.name])
        return web.json_response(node.switching.view(e), status=201)

    @routes.post("/api/v1/switching/back")
    async def switch_back(request: web.Request) -> web.Response:
        body: SwitchCommand = await _body(request, SwitchCommand)
        e = await node.switching.back(body.host_id)
        return web.json_response({"back": True, **node.switching.view(e)})

    @routes.post("/api/v1/switching/apply")
    async def switch_apply(request: web.Request) -> web.Response:
        """Node to node: apply an entry (or its removal) if this table is at `expect`."""
        from twinvol.node.switching import SwitchEntry

        body: SwitchApply = await _body(request, SwitchApply)
        try:
            entry = None if body.entry is None else msgspec.convert(body.entry, SwitchEntry)
        except msgspec.ValidationError as e:
            raise VolumeError(f"bad switching entry: {e}") from None
        await node.switching.apply_remote(body.host_id, entry, body.expect)
        return web.json_response({"node": node.name, "applied": True})

    @routes.get("/api/v1/events")
    async def events(request: web.Request) -> web.StreamResponse:
        """Events as JSON lines: those after `since`, then (with follow=1) live ones."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise VolumeError("since must be an integer") from None
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        if not follow:
            return web.json_response({"events": node.events.since(since),
                                      "seq": node.events.seq})
        q = node.events.subscribe()
        try:
            return await follow_lines(
                request, q, node.events.since(since), number=lambda e: int(e["seq"]),
                encode=lambda e: msgspec.json.encode(e) + b"\n",
                heartbeat=lambda: b'{"type": "heartbeat", "seq": %d}\n' % node.events.seq)
        finally:
            node.events.unsubscribe(q)

    app.add_routes(routes)
    app.add_routes(fault_routes(node))
    app.add_routes(token_routes(store, node.name, f"node {node.name}"))
    return app
