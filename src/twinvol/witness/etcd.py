"""`Witness` kept in an etcd v3 cluster: the builtin witness's rules on a real quorum system.

Client choice: etcd's own gRPC gateway (the JSON API every etcd 3.4+ member serves on its
client port: ``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/watch``)
over aiohttp, which twinvol already depends on. The maintained asyncio client on PyPI,
aetcd 1.0.0, opens one insecure gRPC channel to one ``host:port``: no TLS client
certificates and no failing over between members, both of which this backend needs.

What lives where (keys and rules: etcd_rules.py): the sticky holds are plain keys, written
only by transactions that compare the revisions read; each node's liveness is a key on
its own etcd lease, renewed by its heartbeats. A node that cannot reach a quorum gets no
answer (`WitnessUnreachable`), so it never writes alone; one that serves alone on a hold
stops serving (through its `ServeGate`) as soon as its lease may have run out -- by its
own clock, or at once when a watch sees its ``alive`` key go -- and resumes once a
keepalive succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterable
from typing import Any, Protocol

import aiohttp
import msgspec

from twinvol.witness import WitnessConfig
from twinvol.witness import etcd_rules as rules
from twinvol.witness.client import DEFAULT_TIMEOUT, WitnessRejected, WitnessUnreachable
from twinvol.witness.logic import ArbitrateRequest, Decision, RequestError, Role

log = logging.getLogger("twinvol.witness")

ATTEMPTS = 4          # transactions lost to a concurrent change before giving up for now
GUARD_EVERY = 0.1     # how often a holder checks that its lease still runs
WATCH_RETRY = 0.5


class ServeGate(Protocol):
    """What a node does when it may no longer serve alone (its etcd lease ran out)."""

    def alone(self) -> list[str]:
        """The pairs whose copy here serves without its partner."""

    def fence(self, pairs: list[str], reason: str) -> None: ...

    def unfence(self) -> None: ...


class EtcdRefused(WitnessUnreachable):
    """etcd answered but refused the request (bad lease, bad key...): still no decision."""


def ssl_context(cfg: WitnessConfig) -> ssl.SSLContext | None:
    """The TLS context for ``https`` endpoints (None without TLS); bad files raise
    WitnessUnreachable with the path."""
    if not cfg.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as e:
        raise WitnessUnreachable(f"etcd TLS files unusable ({cfg.ca_file or '-'}, "
                                 f"{cfg.cert_file or '-'}, {cfg.key_file or '-'}): {e}") from None
    return ctx


class EtcdWitness:
    """`Witness` over an etcd cluster; one per node (it keeps that node's lease)."""

    def __init__(self, cfg: WitnessConfig, cluster_name: str, nodes: Iterable[str],
                 gate: ServeGate | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.cfg = cfg
        self.endpoints = list(cfg.endpoints)
        self.scheme = "https" if cfg.tls else "http"
        self.ssl = ssl_context(cfg)
        self.prefix = cfg.key_prefix(cluster_name)
        self.ttl = cfg.lease_ttl
        self.nodes = frozenset(nodes)
        self.gate = gate
        self.timeout = timeout
        self.lease = 0
        self.lease_until = 0.0     # monotonic: our lease surely runs until then, no later
        self.fenced: set[str] = set()   # pairs stopped for want of a lease
        self.node = ""
        self._good = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- keys --------------------------------------------------------------------

    def hold_key(self, pair: str) -> str:
        return f"{self.prefix}holds/{pair}"

    def alive_key(self, node: str) -> str:
        return f"{self.prefix}alive/{node}"

    # ---- transport ---------------------------------------------------------------

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl else False))
        return self._session

    def url(self, endpoint: str, path: str) -> str:
        return f"{self.scheme}://{endpoint}{path}"

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway call, tried on each member in turn (the last good one first),
        all within twice the timeout; the answer, or WitnessUnreachable."""
        deadline = time.monotonic() + 2 * self.timeout
        errors: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._good + i) % n
            ep = self.endpoints[idx]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout = aiohttp.ClientTimeout(total=min(self.timeout, left))
            try:
                async with self._sess().post(self.url(ep, path), json=body,
                                             timeout=timeout) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                errors.append(f"{ep}: {type(e).__name__} {e}".rstrip())
                continue
            try:
                data = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                errors.append(f"{ep}: HTTP {status}, not JSON")
                continue
            if not isinstance(data, dict):
                errors.append(f"{ep}: HTTP {status}, not a JSON object")
                continue
            if status >= 500:
                errors.append(f"{ep}: {data.get('message') or data.get('error') or status}")
                continue
            if status >= 400:
                raise EtcdRefused(f"etcd {ep} refused {path}: "
                                  f"{data.get('message') or data.get('error') or status}")
            self._good = idx
            return data
        raise WitnessUnreachable("no etcd quorum reachable (" + "; ".join(errors or
                                 ["timed out"]) + ")")

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]
                  ) -> tuple[bool, list[dict[str, Any]]]:
        data = await self.call("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(data.get("succeeded")), list(data.get("responses", []))

    # ---- the lease: the right to serve alone ----------------------------------------

    def has_lease(self, now: float | None = None) -> bool:
        """Whether this node may serve alone: its lease surely runs (or, just after the
        start, the first TTL has not passed: a restarted holder gets to renew first)."""
        return (time.monotonic() if now is None else now) < self.lease_until

    async def heartbeat(self, node: str) -> None:
        """Renew this node's lease (or take a new one with its ``alive`` key)."""
        self._start(node)
        sent = time.monotonic()
        if self.lease:
            data = await self.call("/v3/lease/keepalive", {"ID": str(self.lease)})
            ttl = int(data.get("result", {}).get("TTL", 0))
            if ttl > 0:
                self.lease_until = sent + ttl
                return
            log.warning("etcd lease expired", extra={"node": node, "lease": self.lease})
            self.lease = 0
        data = await self.call("/v3/lease/grant", {"TTL": self.ttl})
        lease, ttl = int(data["ID"]), int(data["TTL"])
        value = msgspec.json.encode(rules.Alive(node, lease))
        await self.call("/v3/kv/put", {"key": rules.b64(self.alive_key(node)),
                                       "value": rules.b64(value), "lease": str(lease)})
        self.lease, self.lease_until = lease, sent + ttl
        log.info("etcd lease granted", extra={"node": node, "lease": lease, "ttl": ttl})

    def _start(self, node: str) -> None:
        if self._tasks:
            return
        self.node = node
        self.lease_until = time.monotonic() + self.ttl
        self._tasks = [asyncio.ensure_future(self._guard()),
                       asyncio.ensure_future(self._watch())]

    async def _guard(self) -> None:
        """Copies serving alone stop once the lease may have run out; resume when renewed."""
        while True:
            if self.gate is not None:
                if self.has_lease():
                    if self.fenced:
                        self.fenced.clear()
                        log.info("etcd lease back: serving again", extra={"node": self.node})
                        self.gate.unfence()
                else:
                    alone = sorted(set(self.gate.alone()) - self.fenced)
                    if alone:
                        self.fenced.update(alone)
                        log.warning("no etcd lease: pairs served alone stop serving",
                                    extra={"node": self.node, "pairs": alone})
                        self.gate.fence(alone, f"{self.node} lost its etcd lease: a copy "
                                               "serves alone only while it holds one")
            await asyncio.sleep(GUARD_EVERY)

    async def _watch(self) -> None:
        """Learn at once that etcd dropped our ``alive`` key (our lease expired there)."""
        key = self.alive_key(self.node)
        body = {"create_request": {"key": rules.b64(key)}}
        while True:
            ep = self.endpoints[self._good % len(self.endpoints)]
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
                async with self._sess().post(self.url(ep, "/v3/watch"), json=body,
                                             timeout=timeout) as resp:
                    async for line in resp.content:
                        self._on_watch(line)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                log.debug("etcd watch broke", extra={"endpoint": ep, "error": str(e)})
            self._good += 1  # try another member next time
            await asyncio.sleep(WATCH_RETRY)

    def _on_watch(self, line: bytes) -> None:
        if not line.strip():
            return
        data = msgspec.json.decode(line)
        for ev in data.get("result", {}).get("events", []):
            if ev.get("type") == "DELETE":
                log.warning("etcd dropped this node's alive key", extra={"node": self.node})
                self.lease, self.lease_until = 0, 0.0

    # ---- decisions -----------------------------------------------------------------

    async def _read(self, pair: str, partner: str) -> rules.Seen:
        _, res = await self.txn([], [rules.get(self.hold_key(pair)),
                                     rules.get(self.alive_key(partner))])
        holds = rules.kvs(res[0].get("response_range", {}))
        alive = rules.kvs(res[1].get("response_range", {}))
        try:
            hold = rules.decode_hold(holds[0].value) if holds else None
        except msgspec.DecodeError as e:
            raise WitnessUnreachable(f"etcd key {self.hold_key(pair)} is not a hold: {e}"
                                     ) from None
        left: float | None = None
        if alive:
            data = await self.call("/v3/lease/timetolive", {"ID": str(alive[0].lease)})
            # The key is there: the partner counts as alive until etcd removes it.
            left = max(float(data.get("TTL", 0)), 0.1)
        return rules.Seen(hold, holds[0].mod_revision if holds else 0, left,
                          alive[0].mod_revision if alive else 0)

    async def arbitrate(self, pair: str, node: str, partner: str, role: Role,
                        generation: str) -> Decision:
        req = ArbitrateRequest(pair, node, partner, role, generation)
        for _ in range(ATTEMPTS):
            seen = await self._read(pair, partner)
            try:
                out = rules.arbitrate(req, self.nodes, self.ttl, seen)
            except RequestError as e:
                raise WitnessRejected(str(e), 400, e.code) from None
            if out.write is None:
                return out.decision
            if not self.lease or not self.has_lease():
                raise WitnessUnreachable(f"{node} holds no live etcd lease (its keepalives "
                                         "fail), so it is granted nothing")
            compare = [rules.compare_mod(self.hold_key(pair), seen.hold_rev),
                       rules.compare_lease(self.alive_key(node), self.lease)]
            if seen.hold is None and role == "secondary":
                compare.append(rules.compare_mod(self.alive_key(partner), 0))
            ok, _ = await self.txn(compare, [rules.put(self.hold_key(pair),
                                                       msgspec.json.encode(out.write))])
            if ok:
                log.info("etcd granted", extra={"pair": pair, "node": node,
                                                "reason": out.decision.reason})
                return out.decision
        raise WitnessUnreachable(f"pair {pair} kept changing in etcd; ask again")

    async def release(self, pair: str, node: str) -> bool:
        for _ in range(ATTEMPTS):
            _, res = await self.txn([], [rules.get(self.hold_key(pair))])
            found = rules.kvs(res[0].get("response_range", {}))
            hold = rules.decode_hold(found[0].value) if found else None
            try:
                mine = rules.release(pair, node, self.nodes, hold)
            except RequestError as e:
                raise WitnessRejected(str(e), 409 if e.code == "conflict" else 400,
                                      e.code) from None
            if not mine:
                return False
            ok, _ = await self.txn([rules.compare_mod(self.hold_key(pair),
                                                      found[0].mod_revision)],
                                   [rules.delete(self.hold_key(pair))])
            if ok:
                return True
        raise WitnessUnreachable(f"pair {pair} kept changing in etcd; release again")

    # ---- views (the CLI's `witness status`) -------------------------------------------

    async def pairs(self) -> list[dict[str, Any]]:
        _, res = await self.txn([], [rules.get(self.prefix + "holds/", prefix=True)])
        out = []
        for kv in rules.kvs(res[0].get("response_range", {})):
            h = rules.decode_hold(kv.value)
            out.append({"pair": kv.key.removeprefix(self.prefix + "holds/"), "holder": h.node,
                        "partner": h.partner, "role": h.role, "generation": h.generation,
                        "mod_revision": kv.mod_revision})
        return out

    async def alive(self) -> dict[str, bool]:
        _, res = await self.txn([], [rules.get(self.prefix + "alive/", prefix=True)])
        live = {kv.key.removeprefix(self.prefix + "alive/")
                for kv in rules.kvs(res[0].get("response_range", {}))}
        return {n: n in live for n in sorted(self.nodes)}

    async def members(self) -> list[dict[str, Any]]:
        """Each endpoint's own answer (version, leader), or why it gave none."""
        out = []
        for ep in self.endpoints:
            try:
                async with self._sess().post(self.url(ep, "/v3/maintenance/status"), json={},
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)
                                             ) as resp:
                    data = await resp.json()
                out.append({"endpoint": ep, "reachable": True, "version": data.get("version"),
                            "leader": data.get("leader") == data.get("header", {})
                            .get("member_id")})
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                out.append({"endpoint": ep, "reachable": False,
                            "error": f"{type(e).__name__} {e}".rstrip()})
        return out

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["EtcdRefused", "EtcdWitness", "ServeGate", "ssl_context"]
