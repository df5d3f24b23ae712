"""The node's real code under the deterministic runtime (`simloop`): two storage nodes
A and B (the real `Node`, replication manager, peer links, NBD server, catalog and
bitmaps on files), the real witness arbiter with its state file, and hosts that speak
NBD to them with the real client, all on simulated processes of one `World`.

What stands in for the real thing, and why: the witness's HTTP layer (aiohttp connects
through real sockets) is a one-line JSON exchange carrying the same three calls to the
same `WitnessServer` arbiter and store; a node starts without its HTTP API and fault
relay (not part of replication). Everything else is the production code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from typing import Any

import msgspec

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.nbd.aio import NbdServerProtocol
from twinvol.node.node import Node
from twinvol.replication.core.types import Role
from twinvol.testing.simloop import InlineExecutor, SimLoop
from twinvol.tls.context import nbd_guard
from twinvol.witness import witness_settings
from twinvol.witness.client import WitnessRejected, WitnessUnreachable
from twinvol.witness.logic import ArbitrateRequest, Decision, RequestError
from twinvol.witness.server import PersistError, WitnessServer

HOSTS = {"A": "10.9.0.1", "B": "10.9.0.2", "C": "10.9.0.3", "W": "10.9.0.9"}
NBD_PORT, PEER_PORT, API_PORT, WITNESS_PORT = 10809, 7001, 7000, 7100
WITNESS_TIMEOUT = 1.0   # as the HTTP witness client's
BLOCK = 4096
BLOCK_SPACING = 128 * 1024   # blocks in different resync chunks


def cluster_file(tmp: str) -> ClusterConfig:
    """A cluster of A and B with a witness W, and a far site C, on simulated addresses."""
    cfg = ClusterConfig(
        nodes={n: NodeConfig(site=n, nbd=f"{HOSTS[n]}:{NBD_PORT}", api=f"{HOSTS[n]}:{API_PORT}",
                             data_dir=f"data-{n}", peer=f"{HOSTS[n]}:{PEER_PORT}")
               for n in ("A", "B", "C")},
        cluster=ClusterSection(name="sim", secret="sim-secret"),
        witness={"addr": f"{HOSTS['W']}:{WITNESS_PORT}", "data_dir": "witness"})
    path = os.path.join(tmp, "cluster.toml")
    cluster_mod.dump(cfg, path)
    return cluster_mod.load(path)


# ---- the witness, over a one-line JSON exchange -------------------------------------

class WitnessCall(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    node: str
    pair: str = ""
    partner: str = ""
    role: Role = Role.PRIMARY
    generation: str = ""


class _LineProtocol(asyncio.Protocol):
    """Reads one JSON line, then calls `on_line` with it."""

    def __init__(self, on_line: Any) -> None:
        self.buf = b""
        self.on_line = on_line
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            self.on_line(self, line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_line(self, None)


class SimWitnessService:
    """The witness process: the production `WitnessServer` arbiter and state file."""

    def __init__(self, cluster_path: str, loop: SimLoop, takeover_after: float) -> None:
        settings = witness_settings(cluster_path)
        self.server = WitnessServer(settings, takeover_after, clock=loop.time)
        self.loop = loop

    async def start(self) -> None:
        await self.loop.create_server(lambda: _LineProtocol(self._answer), HOSTS["W"],
                                      WITNESS_PORT)

    def close(self) -> None:
        """Its process died: free the data directory's lock for the next one."""
        with contextlib.suppress(OSError):
            os.close(self.server._lock_fd)

    def _answer(self, proto: _LineProtocol, line: bytes | None) -> None:
        if line is None or proto.transport is None:
            return
        call = msgspec.json.decode(line, type=WitnessCall)
        arbiter, now = self.server.arbiter, self.server.clock()
        before, seq = arbiter.snapshot(), arbiter.seq
        reply: Any
        try:
            if call.op == "heartbeat":
                arbiter.heartbeat(call.node, now)
                reply = {"status": "ok"}
            elif call.op == "arbitrate":
                req = ArbitrateRequest(call.pair, call.node, call.partner,
                                       "primary" if call.role is Role.PRIMARY else "secondary",
                                       call.generation)
                reply = msgspec.to_builtins(arbiter.arbitrate(req, now))
            else:
                reply = {"released": arbiter.release(call.pair, call.node, now)}
            self.server.persist_since(before, seq)
        except RequestError as e:   # what the HTTP API answers 4xx: a rejection
            reply = {"error": str(e), "code": e.code}
        except PersistError as e:
            reply = {"error": str(e)}
        proto.transport.write(msgspec.json.encode(reply) + b"\n")
        proto.transport.close()


class SimWitnessClient:
    """The node's `Witness`: one connection per call, a 1 s budget, as over HTTP."""

    def __init__(self) -> None:
        self.addr = f"{HOSTS['W']}:{WITNESS_PORT}"

    async def _call(self, call: WitnessCall) -> Any:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes | None] = loop.create_future()

        def got(_p: _LineProtocol, line: bytes | None) -> None:
            if not answer.done():
                answer.set_result(line)

        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(WITNESS_TIMEOUT):
                transport, _ = await loop.create_connection(lambda: _LineProtocol(got),
                                                            HOSTS["W"], WITNESS_PORT)
                assert isinstance(transport, asyncio.Transport)
                transport.write(msgspec.json.encode(call) + b"\n")
                line = await answer
        except (OSError, TimeoutError) as e:
            raise WitnessUnreachable(f"witness {self.addr} is not reachable: "
                                     f"{type(e).__name__}: {e}") from None
        finally:
            if transport is not None:
                transport.close()
        if line is None:
            raise WitnessUnreachable(f"witness {self.addr} closed the connection")
        data = msgspec.json.decode(line)
        if isinstance(data, dict) and "code" in data:
            raise WitnessRejected(f"witness {self.addr}: {data['error']}",
                                  409 if data["code"] == "conflict" else 400, data["code"])
        if isinstance(data, dict) and "error" in data:
            raise WitnessUnreachable(f"witness {self.addr} failed: {data['error']}")
        return data

    async def heartbeat(self, node: str) -> None:
        await self._call(WitnessCall("heartbeat", node))

    async def arbitrate(self, pair: str, node: str, partner: str, role: Role,
                        generation: str) -> Decision:
        data = await self._call(WitnessCall("arbitrate", node, pair, partner, role, generation))
        return msgspec.convert(data, Decision)

    async def release(self, pair: str, node: str) -> bool:
        data = await self._call(WitnessCall("release", node, pair))
        return isinstance(data, dict) and data.get("released") is True

    async def close(self) -> None:
        return None


# ---- storage nodes ---------------------------------------------------------------

async def start_node(cluster: ClusterConfig, name: str) -> Node:
    """The production node minus its HTTP API and fault relay, on this simulated loop:
    recovery and replication first, then the NBD listener (as `Node.start`)."""
    node = Node(cluster, name)
    node.executor.shutdown(wait=False)
    node.executor = InlineExecutor()
    node.replication.witness = SimWitnessClient()
    await node.replication.start()
    guard = nbd_guard(cluster, name)
    loop = asyncio.get_running_loop()
    host, port = node.config.nbd_hostport
    await loop.create_server(lambda: NbdServerProtocol(node, node.executor, node.connections,
                                                       node.io_stats, guard), host, port)
    return node


def crash(node: Node) -> None:
    """What a kill -9 leaves: files as written; the catalog's open transaction rolled
    back and the data directory's lock freed (the process's descriptors close)."""
    with contextlib.suppress(Exception):
        node.volumes.catalog.db.close()
    with contextlib.suppress(OSError):
        os.close(node._lock_fd)


# ---- host data ---------------------------------------------------------------------

def block_bytes(block: int, value: int) -> bytes:
    """A block's content for `value`: (value, block) repeated, so a torn or misplaced
    block is seen, not mistaken for a value."""
    return struct.pack("<QQ", value, block) * (BLOCK // 16)


def block_value(block: int, data: bytes) -> int:
    """The value a block holds (0: never written), or -1 when it is not one write's bytes."""
    if data == bytes(BLOCK):
        return 0
    value, where = struct.unpack_from("<QQ", data)
    return value if where == block and data == block_bytes(block, value) else -1


def read_store(node: Node, volume: str, blocks: int) -> list[int]:
    store = node.volumes.get(volume).store
    return [block_value(b, bytes(store.pread(b * BLOCK_SPACING, BLOCK))) for b in range(blocks)]
