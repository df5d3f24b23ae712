"""How the agent talks to a storage node's management API (identity, volumes, events).

`NodeLink` is the small interface the agent uses, so tests can substitute fake
nodes; `HttpNodeLink` is the real one over the node's HTTP API.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import msgspec

from twinvol.host import NodeAddr
from twinvol.tls.psk import PskClientContext


class NodeUnreachable(Exception):
    """The node's API did not answer (or answered something unusable)."""


class LineSource(Protocol):
    """An open event stream: JSON lines; `readline` returns b"" at the end."""

    async def readline(self) -> bytes: ...

    def close(self) -> None: ...


class NodeLink(Protocol):
    name: str
    nbd: tuple[str, int]

    async def export(self, export: str) -> dict[str, Any] | None:
        """The export's identity and I/O mode; None if the node has no such export."""
        ...

    async def volumes(self) -> list[dict[str, Any]]: ...

    async def event_seq(self) -> int:
        """The number of the node's latest event (to resume a stream without replaying)."""
        ...

    async def open_events(self, since: int) -> LineSource: ...


class _HttpLines:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def readline(self) -> bytes:
        try:
            return await self.resp.content.readline()
        except (aiohttp.ClientError, ValueError) as e:
            raise NodeUnreachable(f"event stream broke: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.resp.close()


class HttpNodeLink:
    """A node's HTTP API, with `Authorization: Bearer <secret>` when the cluster has one."""

    def __init__(self, name: str, addr: NodeAddr, session: aiohttp.ClientSession,
                 secret: str | None = None, timeout: float = 3.0) -> None:
        self.name = name
        self.addr = addr
        self.nbd = addr.nbd_hostport
        self.tls: ssl.SSLContext | PskClientContext | None = None  # NBD TLS to this node
        self.base = addr.api_url
        self.session = session
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get(self, path: str) -> tuple[int, Any]:
        try:
            async with self.session.get(self.base + path, headers=self.headers,
                                        timeout=self.timeout) as resp:
                raw = await resp.read()
                try:
                    body = msgspec.json.decode(raw) if raw else None
                except msgspec.DecodeError:
                    body = None
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise NodeUnreachable(f"node {self.name} API {self.base} is not reachable: "
                                  f"{e or type(e).__name__}") from None

    def _fail(self, status: int, body: Any) -> NodeUnreachable:
        msg = ""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            msg = f": {body['error'].get('message', '')}"
        return NodeUnreachable(f"node {self.name} API answered HTTP {status}{msg}")

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   timeout: float = 30.0) -> tuple[int, Any]:
        """Any API call (the switch command the agent carries); (status, decoded body)."""
        try:
            async with self.session.request(method, self.base + path, json=body,
                                            headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout)
                                            ) as resp:
                raw = await resp.read()
                try:
                    return resp.status, msgspec.json.decode(raw) if raw else None
                except msgspec.DecodeError:
                    return resp.status, None
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise NodeUnreachable(f"node {self.name} API {self.base} is not reachable: "
                                  f"{e or type(e).__name__}") from None

    async def export(self, export: str) -> dict[str, Any] | None:
        status, body = await self._get(f"/api/v1/exports/{quote(export, safe='')}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict) \
                or not isinstance(body.get("virtual_identity"), dict):
            raise self._fail(status, body)
        return body

    async def volumes(self) -> list[dict[str, Any]]:
        status, body = await self._get("/api/v1/volumes")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("volumes"),
                                                                          list):
            raise self._fail(status, body)
        return [v for v in body["volumes"] if isinstance(v, dict)]

    async def event_seq(self) -> int:
        status, body = await self._get(f"/api/v1/events?since={1 << 62}")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("seq"), int):
            raise self._fail(status, body)
        return int(body["seq"])

    async def open_events(self, since: int) -> LineSource:
        url = f"{self.base}/api/v1/events?follow=1&since={since}"
        try:
            resp = await self.session.get(
                url, headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout.total))
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise NodeUnreachable(f"node {self.name} event stream {url}: "
                                  f"{e or type(e).__name__}") from None
        if resp.status != 200:
            resp.close()
            raise NodeUnreachable(f"node {self.name} event stream answered HTTP {resp.status}")
        return _HttpLines(resp)
