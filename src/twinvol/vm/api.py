"""The hypervisor host manager's HTTP API, and the server process that runs it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from twinvol.access import TokenError
from twinvol.api_tokens import service_access
from twinvol.cluster import ClusterConfig, ClusterError, split_hostport
from twinvol.httpapi import error_response
from twinvol.tls.context import api_contexts
from twinvol.tls.https import api_site, service_client, service_server
from twinvol.vm.manager import Incoming, Manager
from twinvol.vm.migration import MigrateOptions
from twinvol.vm.spec import SpecError, from_dict
from twinvol.vm.state import VmError

log = logging.getLogger("twinvol.vm")

_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unavailable": 503, "io": 500}

_error = error_response


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except VmError as e:
        return _error(_STATUS.get(e.code, 409), e.code, str(e))
    except SpecError as e:
        return _error(400, "invalid", str(e))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _error(400, "invalid", f"bad request body: {e}")


async def _json(request: web.Request, kind: type[Any]) -> Any:
    return msgspec.json.decode(await request.read() or b"{}", type=kind)


def make_app(m: Manager) -> web.Application:
    """The manager's API: the cluster secret (admin) or a scoped token (hashes in
    DATA_DIR/tokens.json), each call that changes something in DATA_DIR/audit.log."""
    os.makedirs(m.data_dir, exist_ok=True)
    try:
        guard, token_api = service_access(m.data_dir, m.cfg.cluster.secret, f"vmhost {m.name}",
                                          metrics_open=m.cfg.cluster.metrics_open)
    except TokenError as e:
        raise VmError(str(e)) from None
    app = web.Application(middlewares=[guard, _errors], client_max_size=256 << 20)
    app.add_routes(token_api)
    r = web.RouteTableDef()

    @r.get("/api/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "vmhost": m.name})

    @r.get("/api/v1/host")
    async def host(_: web.Request) -> web.Response:
        return web.json_response(m.host_view())

    @r.get("/api/v1/vms")
    async def vms(_: web.Request) -> web.Response:
        return web.json_response({"vms": [m.view(v) for v in m.vms.values()],
                                  "incoming": [m.view(v) for v in m.incoming.values()]})

    @r.post("/api/v1/vms")
    async def define(request: web.Request) -> web.Response:
        raw = await _json(request, dict[str, Any])
        vm = await m.define(from_dict(raw))
        return web.json_response(m.view(vm), status=201)

    @r.get("/api/v1/vms/{name}")
    async def show(request: web.Request) -> web.Response:
        return web.json_response(m.view(m.get(request.match_info["name"])))

    @r.delete("/api/v1/vms/{name}")
    async def undefine(request: web.Request) -> web.Response:
        m.undefine(request.match_info["name"])
        return web.json_response({"undefined": request.match_info["name"]})

    @r.post("/api/v1/vms/{name}/start")
    async def start(request: web.Request) -> web.Response:
        return web.json_response(m.view(await m.start_vm(request.match_info["name"])))

    @r.post("/api/v1/vms/{name}/stop")
    async def stop(request: web.Request) -> web.Response:
        force = request.query.get("force") in ("1", "true")
        return web.json_response(m.view(await m.stop_vm(request.match_info["name"], force)))

    @r.post("/api/v1/vms/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        opts = await _json(request, MigrateOptions)
        job = m.start_migration(request.match_info["name"], opts)
        return web.json_response(job.view(), status=202)

    @r.get("/api/v1/vms/{name}/migration")
    async def migration(request: web.Request) -> web.Response:
        job = m.migrations.get(request.match_info["name"])
        if job is None:
            raise VmError(f"no migration of VM {request.match_info['name']} from host "
                          f"{m.name}", "not_found")
        return web.json_response(job.view())

    @r.post("/api/v1/incoming")
    async def incoming(request: web.Request) -> web.Response:
        return web.json_response(await m.prepare_incoming(await _json(request, Incoming)),
                                 status=201)

    @r.post("/api/v1/incoming/{name}/held")
    async def held(request: web.Request) -> web.Response:
        return web.json_response(await m.take_held(request.match_info["name"],
                                                   await request.read()))

    @r.post("/api/v1/incoming/{name}/resume")
    async def resume(request: web.Request) -> web.Response:
        return web.json_response(await m.resume_incoming(request.match_info["name"]))

    @r.delete("/api/v1/incoming/{name}")
    async def drop(request: web.Request) -> web.Response:
        await m._drop_incoming(request.match_info["name"])
        return web.json_response({"dropped": request.match_info["name"]})

    app.add_routes(r)
    return app


async def serve(cfg: ClusterConfig, name: str) -> None:
    m = Manager(cfg, name)
    m.load_definitions()
    directory = m.cfg.tls_dir() if m.cfg.https_apis else None
    try:
        server_ctx = service_server(directory if m.host.api_tls else None)
        client_ctx = api_contexts(m.cfg)[1] or service_client(directory)
    except ClusterError as e:
        raise VmError(str(e)) from None
    m.calls.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ctx) if client_ctx else None)
    runner = web.AppRunner(make_app(m), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_hostport(m.host.api)
    site = api_site(runner, host, port, server_ctx, f"vmhost {m.name}")
    try:
        await site.start()
    except OSError as e:
        await m.calls.session.close()
        raise VmError(f"cannot listen on {m.host.api}: {e.strerror}") from None
    log.info("vm host manager serving", extra={"vmhost": name, "api": m.host.api,
                                               "accel": m.accel})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await m.stop()
        await runner.cleanup()


def run(cfg: ClusterConfig, name: str) -> None:
    """Run a hypervisor host manager in the foreground until SIGTERM/SIGINT."""
    cfg.vmhost(name)
    asyncio.run(serve(cfg, name))
