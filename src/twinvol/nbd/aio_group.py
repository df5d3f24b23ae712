"""Operations on a group of open NBD connections: swap their backend under a barrier
(switching), drain them at shutdown, close them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from twinvol.nbd.aio import Backend, NbdServerProtocol
from twinvol.nbd.constants import Cmd


class DrainTimeout(Exception):
    """In-flight requests did not finish in time; the connections keep their backend."""


async def rebind(connections: Sequence[NbdServerProtocol], backend: Backend | None,
                 timeout: float = 10.0) -> None:
    """Swap the backend of open connections without the clients noticing.

    Reading stops on every connection, requests already received complete on the old
    backend (which is then flushed, so a later FLUSH on the new one still covers writes
    acknowledged before), and the new backend is installed on all of them in one loop
    step before reading resumes: every request acknowledged before the swap was served
    by the old backend, every request read after it by the new one. `backend=None`
    keeps the current backend (a barrier only)."""
    conns = [c for c in connections if c.transport is not None
             and not c.transport.is_closing()]
    for c in conns:
        c._held = True
        c._update_reading()
    try:
        busy = [c for c in conns if c._inflight]
        if busy:
            await asyncio.wait([c.idle() for c in busy], timeout=timeout)
            late = sum(c._inflight for c in busy)
            if late:
                raise DrainTimeout(f"{late} request(s) in flight did not finish within "
                                   f"{timeout:g} s")
        olds = {id(c.backend): c.backend for c in conns if c.backend is not None}
        if backend is not None:
            loop = asyncio.get_running_loop()
            for old in olds.values():
                if old is backend:
                    continue
                submit = getattr(old, "submit", None)
                if getattr(old, "async_writes", False) and submit is not None:
                    await submit(int(Cmd.FLUSH), 0, 0, None, 0)
                else:
                    executor = conns[0].executor
                    await loop.run_in_executor(executor, old.flush)
            for c in conns:
                if c.export is not None:
                    c._set_backend(backend)
    finally:
        for c in conns:
            c._held = False
            c._update_reading()


async def shutdown_all(connections: Iterable[NbdServerProtocol], timeout: float = 10.0) -> None:
    """Server shutdown: stop reading, let in-flight requests finish and reply, then close."""
    await asyncio.gather(*(c.drain_and_close(timeout) for c in list(connections)))


def close_all(connections: Iterable[NbdServerProtocol]) -> None:
    for c in list(connections):
        if c.transport is not None:
            c.transport.close()

