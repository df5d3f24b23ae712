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
