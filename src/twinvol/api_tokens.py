"""Token routes (admin scope) and the access guard every twinvol HTTP API mounts: the
nodes, the host agent, the witness and the VM hosts each keep the token hashes and the
audit log of the calls they executed.

`twinvol token create` makes the token, registers only its hash on every component, and
shows the token once. A create never replaces: a name that exists with another hash is
a 409 conflict, and a delete may name the hash it expects (`?hash=`), so the CLI can
undo exactly what it added when another component refuses (all or nothing).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

import msgspec
from aiohttp import web

from twinvol.access import TokenError, TokenStore
from twinvol.audit import AuditLog
from twinvol.httpapi import access_control, error_response


class AddToken(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    scope: str
    hash: str


def _view(t: Any) -> dict[str, Any]:
    return {"name": t.name, "scope": t.scope.value, "created": t.created}


def token_routes(store: TokenStore, component: str, label: str = "") -> web.RouteTableDef:
    """GET/POST /api/v1/tokens and DELETE /api/v1/tokens/{name}; answers name the
    component (`node`), errors its `label` ("node A"), so the CLI can say where."""
    routes = web.RouteTableDef()
    label = label or component

    @routes.get("/api/v1/tokens")
    async def list_tokens(_: web.Request) -> web.Response:
        return web.json_response({"node": component, "tokens": [
            _view(t) for t in sorted(store.tokens.values(), key=lambda t: t.name)]})

    @routes.post("/api/v1/tokens")
    async def add_token(request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=AddToken)
            old = store.tokens.get(body.name)
            if old is not None and old.hash == body.hash and old.scope == body.scope:
                return web.json_response({"node": component, **_view(old)})  # a retry
            if old is not None:
                return error_response(409, "conflict", f"a token named {body.name!r} "
                                      f"already exists on {label} (delete it first)")
            tok = store.add(body.name, body.scope, body.hash)
        except (msgspec.DecodeError, TokenError) as e:
            return error_response(400, "invalid", str(e))
        return web.json_response({"node": component, **_view(tok)}, status=201)

    @routes.delete("/api/v1/tokens/{name}")
    async def remove_token(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        want = request.query.get("hash")
        tok = store.tokens.get(name)
        if want is not None and tok is not None and tok.hash != want:
            return error_response(409, "conflict", f"token {name!r} on {label} is "
                                  "another token than the one named (left alone)")
        try:
            store.remove(name)
        except TokenError as e:
            return error_response(404, "not_found", str(e))
        return web.json_response({"node": component, "deleted": name})

    return routes


def service_access(app_dir: str, secret: str | None, component: str, *,
                   open_paths: Collection[str] = ("/api/v1/health",),
                   metrics_open: bool = False, prefix: str = "") -> tuple[Any, web.RouteTableDef]:
    """(middleware, token routes) of a component keeping `{prefix}tokens.json` and
    `{prefix}audit.log` in `app_dir`: scoped tokens as on a node (the cluster secret is
    admin), and one audit line per call that changes something."""
    store = TokenStore(os.path.join(app_dir, f"{prefix}tokens.json"))  # or TokenError
    audit = AuditLog(os.path.join(app_dir, f"{prefix}audit.log"))
    guard = access_control(secret, store, open_paths=open_paths, metrics_open=metrics_open,
                           audit=audit)
    return guard, token_routes(store, component)
