"""What every twinvol HTTP API shares: the JSON error body and the cluster-secret check.

Errors are `{"error": {"code", "message"}}`. With a cluster secret, a request must carry
`Authorization: Bearer <secret>` (compared in constant time); a component decides which
paths stay open (a health probe, say).
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from typing import Any

from aiohttp import web

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
