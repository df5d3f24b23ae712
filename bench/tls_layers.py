"""Where TLS should live under the sans-IO NBD server: the loop's own `start_tls`
(what twinvol uses) against a memory-BIO TLS object driven from the protocol in Python
(`ssl.SSLObject` over `ssl.MemoryBIO`, the other design the issue names).

A receiver on loopback decrypts and counts `--total` bytes that a sender writes in
`--chunk` byte writes, three ways: plain TCP, the loop's TLS transport, and a plain
transport whose protocol feeds a memory-BIO `SSLObject` itself. Both TLS variants use
the same certificates and OpenSSL; the difference is who runs the record loop. Under
uvloop (as the node runs) the loop's TLS is Cython; under asyncio's default loop it is
Python too (`--loop asyncio`).

    .venv/bin/python bench/tls_layers.py [--total 256M] [--chunk 4K,1M] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

try:
    import uvloop

    from twinvol.sizes import parse_size
    from twinvol.tls.certs import Role, init_ca, issue
    from twinvol.tls.context import client_context, server_context
except ImportError:  # pragma: no cover - only when run with the wrong interpreter
    sys.exit("bench/tls_layers.py needs twinvol importable: run it with .venv/bin/python")

console = Console(width=None if sys.stdout.isatty() else 120)


class Sink(asyncio.Protocol):
    """Counts received (decrypted) bytes; `done` resolves at `total`."""

    def __init__(self, total: int, done: asyncio.Future[float]) -> None:
        self.total, self.got, self.done = total, 0, done

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.total and not self.done.done():
            self.done.set_result(time.perf_counter())


class BioSink(asyncio.Protocol):
    """The memory-BIO design: plain transport, TLS records handled here in Python."""

    def __init__(self, ctx: ssl.SSLContext, total: int, done: asyncio.Future[float]) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.total, self.got, self.done = total, 0, done
        self.shaken = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.inc.write(data)
        if not self.shaken:
            try:
                self.tls.do_handshake()
                self.shaken = True
            except ssl.SSLWantReadError:
                pass
            self._flush()
            if not self.shaken:
                return
        while True:
            try:
                chunk = self.tls.read(1 << 18)
            except ssl.SSLWantReadError:
                break
            if not chunk:  # close_notify
                break
            self.got += len(chunk)
        self._flush()
        if self.got >= self.total and not self.done.done():
            self.done.set_result(time.perf_counter())

    def _flush(self) -> None:
        pending = self.out.read()
        if pending and self.transport is not None:
            self.transport.write(pending)


async def one(kind: str, total: int, chunk: int, sctx: ssl.SSLContext,
              cctx: ssl.SSLContext) -> float:
    """MiB/s for one way of receiving `total` bytes sent in `chunk` byte writes."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    if kind == "memory BIO":
        server = await loop.create_server(lambda: BioSink(sctx, total, done), "127.0.0.1", 0)
    else:
        server = await loop.create_server(lambda: Sink(total, done), "127.0.0.1", 0,
                                          ssl=sctx if kind == "loop start_tls" else None)
    port = server.sockets[0].getsockname()[1]
    use_tls = kind != "plain"
    _r, writer = await asyncio.open_connection("127.0.0.1", port,
                                               ssl=cctx if use_tls else None,
                                               server_hostname="127.0.0.1" if use_tls else None)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = os.urandom(chunk)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(payload)
        sent += chunk
        if writer.transport.get_write_buffer_size() > 4 << 20:
            await writer.drain()
    t1 = await asyncio.wait_for(done, 120)
    writer.close()
    server.close()
    return total / (t1 - t0) / (1 << 20)


async def run_all(total: int, chunks: list[int], sctx: ssl.SSLContext,
                  cctx: ssl.SSLContext) -> dict[tuple[int, str], float]:
    out = {}
    for chunk in chunks:
        for kind in ("plain", "loop start_tls", "memory BIO"):
            out[(chunk, kind)] = await one(kind, total, chunk, sctx, cctx)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", default="256M")
    ap.add_argument("--chunk", default="4K,1M")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    opts = ap.parse_args()
    total = parse_size(opts.total)
    chunks = [parse_size(c) for c in opts.chunk.split(",")]
    certs = os.path.join(tempfile.mkdtemp(prefix="twinvol-tls-layers-"), "tls")
    init_ca(certs)
    issue(certs, Role.SERVER, hosts=["127.0.0.1"])
    sctx, cctx = server_context(certs), client_context(certs)
    coro = run_all(total, chunks, sctx, cctx)
    rates = uvloop.run(coro) if opts.loop == "uvloop" else asyncio.run(coro)
    t = Table(title=f"TLS receive path, {opts.loop} loop, {opts.total} per run (MiB/s)")
    for col in ("write size", "plain", "loop start_tls", "memory BIO", "BIO/start_tls"):
        t.add_column(col, justify="right")
    for chunk in chunks:
        r = {k: rates[(chunk, k)] for k in ("plain", "loop start_tls", "memory BIO")}
        t.add_row(str(chunk), f"{r['plain']:.0f}", f"{r['loop start_tls']:.0f}",
                  f"{r['memory BIO']:.0f}", f"{r['memory BIO'] / r['loop start_tls']:.2f}")
    console.print(t)


if __name__ == "__main__":
    main()
