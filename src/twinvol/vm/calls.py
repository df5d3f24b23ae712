"""HTTP from a hypervisor host manager to the storage nodes and to other hosts."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from twinvol.cluster import ClusterConfig


class HostCallError(Exception):
    """A call failed; `unreachable` when the peer could not be reached at all (not
    after a timeout, when the call may have run there)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class HostCalls:
    """Calls with the cluster's bearer token; every failure is a `HostCallError`."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None  # opened by the server

    def _headers(self) -> dict[str, str]:
        s = self.cfg.cluster.secret
        return {"Authorization": f"Bearer {s}"} if s else {}

    async def node_get(self, node: str, path: str) -> Any:
        """GET on a node's API; None for 404; HostCallError when unreachable."""
        url = self.cfg.node(node).api_url + path
        assert self.session is not None
        try:
            async with self.session.get(url, headers=self._headers(),
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 404:
                    return None
                body = await r.json(content_type=None)
                if r.status >= 400:
                    raise HostCallError(f"node {node}: {body['error']['message']}")
                return body
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise HostCallError(f"storage node {node} is not reachable ({e or type(e)})",
                                unreachable=True) from None

    async def call_host(self, host: str, method: str, path: str,
                        body: dict[str, Any] | None = None, raw: bytes | None = None,
                        timeout: float = 10) -> Any:
        url = self.cfg.vmhost(host).api_url + path
        assert self.session is not None
        headers = self._headers()
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, url, data=data, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                res = await r.json(content_type=None)
                if r.status >= 400:
                    msg = res["error"]["message"] if isinstance(res, dict) else str(res)
                    raise HostCallError(msg)
                return res
        except TimeoutError:
            raise HostCallError(f"host {host} did not answer within {timeout:g}s") from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise HostCallError(f"host {host} is not reachable ({e or type(e).__name__})",
                                unreachable=True) from None
        except (ValueError, KeyError, TypeError, aiohttp.ClientError) as e:
            raise HostCallError(f"host {host}: bad answer ({e})") from None
