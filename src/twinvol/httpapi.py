"""What every twinvol HTTP API shares: the JSON error body and the cluster-secret check.

Errors are `{"error": {"code", "message"}}`. With a cluster secret, a request must carry
`Authorization: Bearer <secret>` (compared in constant time); a component decides which
paths stay open (a health probe, say).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from aiohttp import web

from twinvol.access import SECRET_NAME, Scope, TokenStore, required_scope
from twinvol.audit import AuditLog

T = TypeVar("T")

UNAUTHORIZED = "missing or wrong cluster secret: send 'Authorization: Bearer <[cluster] secret>'"


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers or None)


def bearer_ok(request: web.Request, secret: str | None) -> bool:
    """True when no secret is set or the request carries it."""
    return not secret or hmac.compare_digest(request.headers.get("Authorization", ""),
                                             f"Bearer {secret}")


def unauthorized() -> web.Response:
    return error_response(401, "unauthorized", UNAUTHORIZED, **{"WWW-Authenticate": "Bearer"})


def bearer_auth(secret: str | None,
                open_paths: Collection[str] = ("/api/v1/health",)) -> Any:
    """Middleware refusing requests without the cluster secret, except on `open_paths`."""

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in open_paths and not bearer_ok(request, secret):
            return unauthorized()
        return await handler(request)  # type: ignore[no-any-return]

    return auth


def _caller(request: web.Request, secret: str | None,
            store: TokenStore | None) -> tuple[str, Scope] | None:
    """Who the bearer credential names: the cluster secret (admin) or a token."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return None
    if secret and hmac.compare_digest(auth, f"Bearer {secret}"):
        return SECRET_NAME, Scope.ADMIN
    tok = store.identify(auth[7:]) if store is not None else None
    return None if tok is None else (tok.name, tok.scope)


def access_control(secret: str | None, store: TokenStore | None, *,
                   open_paths: Collection[str] = ("/api/v1/health",),
                   metrics_open: bool = False, audit: AuditLog | None = None) -> Any:
    """Middleware: the caller's credential must carry the scope the call needs (see
    twinvol.access) once a secret or a token exists; every call that is not a read is
    written to `audit`, refused ones included."""
    open_set = set(open_paths) | ({"/metrics"} if metrics_open else set())

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        who = _caller(request, secret, store)
        needed = required_scope(request.method, request.path)
        enforced = bool(secret) or bool(store is not None and store.tokens)
        resp: web.StreamResponse | None = None
        if enforced and request.path not in open_set:
            if who is None:
                resp = unauthorized()
            elif not who[1].allows(needed):
                resp = error_response(403, "forbidden", f"token {who[0]!r} has scope "
                                      f"{who[1]}; {request.method} {request.path} needs "
                                      f"{needed}")
        status = 500
        try:
            if resp is None:
                resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            if audit is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
                audit.record(who[0] if who else "-", request.remote or "?", request.method,
                             request.path_qs, status)

    return guard


async def follow_lines(request: web.Request, queue: asyncio.Queue[T | None],
                       backlog: Iterable[T], *, number: Callable[[T], int],
                       encode: Callable[[T], bytes], heartbeat: Callable[[], bytes],
                       every: float = 2.0, first: bytes = b"", after: int = -1
                       ) -> web.StreamResponse:
    """Stream numbered items as JSON lines: `first`, the backlog, then live items from
    `queue` (None ends the stream), skipping any numbered `after` or already sent, with a
    heartbeat line
    every `every` seconds of silence so a follower can tell a dead link from a quiet one.
    The caller subscribed `queue` and unsubscribes it afterwards."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        if first:
            await resp.write(first)
        last = after
        for item in backlog:
            await resp.write(encode(item))
            last = number(item)
        while True:
            try:
                got = await asyncio.wait_for(queue.get(), every)
            except TimeoutError:
                await resp.write(heartbeat())
                continue
            if got is None:
                break
            if number(got) > last:
                await resp.write(encode(got))
                last = number(got)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp
