"""The node's event stream: every state change a host or operator may act on.

Events are numbered per node (`seq`), kept in a bounded ring so a subscriber can
resume with `since`, and pushed to live subscribers. A subscriber that does not
keep up is dropped (it reconnects with `since` and loses nothing still in the ring).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from twinvol import clock

RING = 4096
QUEUE = 1024

log = logging.getLogger("twinvol.events")


class EventBus:
    def __init__(self, node: str, site: str) -> None:
        self.node = node
        self.site = site
        self.seq = 0
        self.ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=RING)
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        # Called in publish, never dropped (fault detection must see every event).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def listen(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.listeners.append(fn)

    def publish(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        ev = {"seq": self.seq, "time": round(clock.wall(), 6), "node": self.node,
              "site": self.site, "type": type_, **fields}
        self.ring.append(ev)
        log.info("event", extra={"event": ev})
        for fn in self.listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed", extra={"event": ev})
        for q in list(self.subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self.subscribers.discard(q)
                q.put_nowait(None) if q.empty() else None
        return ev

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [e for e in self.ring if e["seq"] > seq]

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.subscribers.discard(q)

    def close(self) -> None:
        """End every live stream now (shutdown must not wait for a heartbeat)."""
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        self.subscribers.clear()
