"""How a node talks to its witness.

`Witness` is the interface the replication code depends on; `HttpWitness` speaks to the
builtin witness service and `LocalWitness` wraps an in-process `Arbiter` (unit tests and
the simulator). Another backend -- an etcd cluster holding the same sticky per-pair
holds in keys written with a compare-and-swap transaction -- only has to implement this
protocol.

The rule for callers: any `WitnessError` (the witness cannot be reached, answers with
garbage or refuses the request) means *no decision*, and a node that has lost its
partner must not keep writing without one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from ssl import SSLContext
from typing import Any, Protocol, runtime_checkable

import aiohttp
import msgspec

from twinvol.cluster import split_hostport
from twinvol.witness.logic import Arbiter, ArbitrateRequest, Decision, RequestError, Role

DEFAULT_TIMEOUT = 1.0


class WitnessError(Exception):
    """No decision could be had from the witness."""


class WitnessUnreachable(WitnessError):
    """The witness did not answer (network error, timeout, server error, bad reply)."""


class WitnessRejected(WitnessError):
    """The witness refused the request (bad input, wrong secret, not the holder)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@runtime_checkable
class Witness(Protocol):
    """The third party that decides which side of a broken pair keeps writing."""

    async def heartbeat(self, node: str) -> None:
        """Tell the witness `node` is alive (every ~0.5 s)."""

    async def arbitrate(self, pair: str, node: str, partner: str, role: Role,
                        generation: str) -> Decision:
        """`node` lost `partner` for `pair`: may it keep writing alone?"""

    async def release(self, pair: str, node: str) -> bool:
        """`pair` is mirrored again: drop `node`'s hold (False if nothing was held)."""

    async def close(self) -> None:
        """Free connections."""


class HttpWitness:
    """`Witness` over the builtin witness's HTTP API, with short timeouts."""

    def __init__(self, addr: str, secret: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, ssl: SSLContext | None = None) -> None:
        host, port = split_hostport(addr)
        self.addr = addr
        self.ssl = ssl  # HTTPS with this client context ([tls] api)
        self.url = f"{'https' if ssl else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpWitness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers=self.headers,
                connector=aiohttp.TCPConnector(ssl=self.ssl) if self.ssl else None)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call: the decoded JSON answer, or WitnessUnreachable / WitnessRejected."""
        try:
            async with self._sess().request(method, self.url + path, json=body) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise WitnessUnreachable(f"witness {self.addr} is not reachable: "
                                     f"{type(e).__name__}: {e}") from None
        try:
            data = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            raise WitnessUnreachable(f"witness {self.addr} sent a reply that is not JSON "
                                     f"(HTTP {status})") from None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            err = err if isinstance(err, dict) else {}
            message = str(err.get("message", f"HTTP {status}"))
            if status >= 500:
                raise WitnessUnreachable(f"witness {self.addr} failed: {message}")
            raise WitnessRejected(f"witness {self.addr}: {message}", status,
                                  str(err.get("code", "http")))
        return data

    async def heartbeat(self, node: str) -> None:
        await self.request("POST", "/api/v1/heartbeat", {"node": node})

    async def arbitrate(self, pair: str, node: str, partner: str, role: Role,
                        generation: str) -> Decision:
        data = await self.request("POST", "/api/v1/arbitrate", {
            "pair": pair, "node": node, "partner": partner, "role": role,
            "generation": generation})
        try:
            return msgspec.convert(data, Decision)
        except msgspec.ValidationError as e:
            raise WitnessUnreachable(f"witness {self.addr} sent a bad decision: {e}") from None

    async def release(self, pair: str, node: str) -> bool:
        data = await self.request("POST", "/api/v1/release", {"pair": pair, "node": node})
        return isinstance(data, dict) and data.get("released") is True

    async def pairs(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/api/v1/pairs")
        return data["pairs"]  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/api/v1/status")  # type: ignore[no-any-return]


class LocalWitness:
    """`Witness` over an in-process `Arbiter`: for unit tests and the simulator, where
    `clock` is the simulated time."""

    def __init__(self, arbiter: Arbiter, clock: Callable[[], float] = time.monotonic) -> None:
        self.arbiter = arbiter
        self.clock = clock

    async def heartbeat(self, node: str) -> None:
        self._call(self.arbiter.heartbeat, node, self.clock())

    async def arbitrate(self, pair: str, node: str, partner: str, role: Role,
                        generation: str) -> Decision:
        req = ArbitrateRequest(pair, node, partner, role, generation)
        decision: Decision = self._call(self.arbiter.arbitrate, req, self.clock())
        return decision

    async def release(self, pair: str, node: str) -> bool:
        released: bool = self._call(self.arbiter.release, pair, node, self.clock())
        return released

    async def close(self) -> None:
        await asyncio.sleep(0)

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RequestError as e:
            raise WitnessRejected(str(e), 409 if e.code == "conflict" else 400, e.code) from None


__all__ = ["HttpWitness", "LocalWitness", "Witness", "WitnessError", "WitnessRejected",
           "WitnessUnreachable"]
