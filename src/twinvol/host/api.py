"""The host agent's HTTP API: health, status, and the switch command it carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from twinvol.faults.host import HostFaults
from twinvol.host.metrics import CONTENT_TYPE, exposition
from twinvol.host.switching import Switching
from twinvol.httpapi import bearer_ok, unauthorized


def make_app(*, nbd: str, secret: str | None, report: Callable[[], dict[str, Any]],
             switches: Switching, faults: HostFaults | None,
             access: tuple[Any, web.RouteTableDef] | None = None) -> web.Application:
    """The API of one host agent; `report` builds its status document. `access`: the
    scoped-token guard and token routes (api_tokens.service_access); without it (an agent
    built by a test) only the switch command needs the cluster secret."""
    app = web.Application(middlewares=[access[0]] if access else [])
    routes = web.RouteTableDef()

    @routes.get("/api/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "component": "host",
                                  "nbd": nbd})

    @routes.get("/api/v1/status")
    async def status(_: web.Request) -> web.Response:
        return web.json_response(report())

    render = exposition(report)

    @routes.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})

    @routes.post("/api/v1/switch")
    async def switch(request: web.Request) -> web.Response:
        """The host's switch command: {"export", "to"} or {"export", "back": true}."""
        if access is None and not bearer_ok(request, secret):
            return unauthorized()
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("export"), str) \
                or not (isinstance(body.get("to"), str) or body.get("back") is True):
            return web.json_response({"error": {"code": "invalid", "message":
                                                'body must be {"export": NAME, "to": TARGET} '
                                                'or {"export": NAME, "back": true}'}},
                                     status=400)
        status, answer = await switches.switch(body["export"], body.get("to"),
                                               body.get("back") is True)
        return web.json_response(answer, status=status)

    @routes.get("/api/v1/switching")
    async def switching(_: web.Request) -> web.Response:
        await switches.load()
        return web.json_response({"switching": switches.table})

    app.add_routes(routes)
    if access is not None:
        app.add_routes(access[1])
    if faults is not None:
        app.add_routes(faults.routes())
    return app
