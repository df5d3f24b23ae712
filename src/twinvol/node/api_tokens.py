"""The node's token routes (admin scope): list, add (by hash), remove. The CLI makes the
token, sends only its hash to every node, and shows the token once."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from twinvol.access import TokenError, TokenStore
from twinvol.httpapi import error_response


class AddToken(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    scope: str
    hash: str


def _view(t: Any) -> dict[str, Any]:
    return {"name": t.name, "scope": t.scope.value, "created": t.created}


def token_routes(store: TokenStore, node: str) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/api/v1/tokens")
    async def list_tokens(_: web.Request) -> web.Response:
        return web.json_response({"node": node, "tokens": [
            _view(t) for t in sorted(store.tokens.values(), key=lambda t: t.name)]})

    @routes.post("/api/v1/tokens")
    async def add_token(request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=AddToken)
            tok = store.add(body.name, body.scope, body.hash)
        except (msgspec.DecodeError, TokenError) as e:
            return error_response(400, "invalid", str(e))
        return web.json_response({"node": node, **_view(tok)}, status=201)

    @routes.delete("/api/v1/tokens/{name}")
    async def remove_token(request: web.Request) -> web.Response:
        try:
            store.remove(request.match_info["name"])
        except TokenError as e:
            return error_response(404, "not_found", str(e))
        return web.json_response({"node": node, "deleted": request.match_info["name"]})

    return routes
