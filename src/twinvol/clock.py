"""The node's clocks, as a port: `monotonic()` for timers and leases, `wall()` for
timestamps, `boot_id()` for telling a process restart from a machine restart.

Production reads `time` directly. The deterministic simulator (`twinvol.testing.simloop`)
runs each simulated node on its own event loop with its own drifting virtual clock and
installs that clock here for the loop, so the same replication code reads simulated time
there. The lookup costs one dict test while no simulated loop exists.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Source(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    def boot_id(self) -> str: ...


_sources: dict[asyncio.AbstractEventLoop, Source] = {}


def _source() -> Source | None:
    loop = asyncio._get_running_loop()
    return _sources.get(loop) if loop is not None else None


def monotonic() -> float:
    if _sources:
        src = _source()
        if src is not None:
            return src.monotonic()
    return time.monotonic()


def wall() -> float:
    if _sources:
        src = _source()
        if src is not None:
            return src.wall()
    return time.time()


_BOOT: list[str] = []


def boot_id() -> str:
    """This machine's boot (the epoch of `monotonic`): it changes when the machine
    restarts, i.e. when writes not yet synced to disk may have been lost."""
    if _sources:
        src = _source()
        if src is not None:
            return src.boot_id()
    if not _BOOT:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT.append(f.read().strip())
        except OSError:
            _BOOT.append("unknown")
    return _BOOT[0]


def install(loop: asyncio.AbstractEventLoop, source: Source) -> None:
    """Make code running on `loop` read `source` (the simulator's per-node clock)."""
    _sources[loop] = source


def remove(loop: asyncio.AbstractEventLoop) -> None:
    _sources.pop(loop, None)
