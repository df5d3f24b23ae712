"""Follow a node's pushed event stream (GET /api/v1/events?follow=1), forever.

Nodes push state changes (I/O mode, volume created/deleted...) as JSON lines and
a heartbeat line every 2 s, so silence longer than `silence` means the stream is
dead even if TCP has not noticed. The watcher then reconnects with backoff and
resumes after the last event it saw (from the start when the node restarted and
its numbering went back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from twinvol.host.nodes import LineSource, NodeLink, NodeUnreachable

log = logging.getLogger("twinvol.host.events")

SILENCE = 6.0
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0


class NodeWatcher:
    def __init__(self, link: NodeLink, on_event: Callable[[str, dict[str, Any]], None],
                 on_state: Callable[[str, bool], None], *, silence: float = SILENCE,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        self.link = link
        self.node = link.name
        self.on_event = on_event
        self.on_state = on_state
        self.silence = silence
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.up = False
        self.seq: int | None = None  # last event number seen
        self.connects = 0
        self.events = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"events-{self.node}")

    async def stop(self, timeout: float = 1.0) -> None:
        """End the watcher; wait at most `timeout` for its task (never forever)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=timeout)

    def status(self) -> dict[str, Any]:
        return {"state": "up" if self.up else "down", "seq": self.seq,
                "connects": self.connects, "events": self.events, "error": self.last_error}

    async def _run(self) -> None:
        delay = self.min_backoff
        while not self._stopping:
            src: LineSource | None = None
            try:
                current = await self.link.event_seq()
                if self.seq is None:
                    since = current  # first contact: the present state is read elsewhere
                elif current < self.seq:
                    since = 0  # the node restarted and numbers from 1 again
                else:
                    since = self.seq
                self.seq = since
                src = await self.link.open_events(since)
                self.connects += 1
                self.last_error = None
                self._set_up(True)
                delay = self.min_backoff
                while True:
                    line = await asyncio.wait_for(src.readline(), self.silence)
                    if not line:
                        raise NodeUnreachable("event stream ended")
                    self._line(line)
            except TimeoutError:
                self.last_error = f"no event or heartbeat for {self.silence:g} s"
            except NodeUnreachable as e:
                self.last_error = str(e)
            except asyncio.CancelledError:
                self._set_up(False)
                raise
            except Exception as e:  # never let one bad stream kill the watcher
                log.exception("event stream failed", extra={"node": self.node})
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                if src is not None:
                    src.close()
            if self.up:
                log.warning("node event stream lost",
                            extra={"node": self.node, "reason": self.last_error})
            self._set_up(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        self.on_state(self.node, up)

    def _line(self, line: bytes) -> None:
        try:
            ev = msgspec.json.decode(line)
        except msgspec.DecodeError:
            log.warning("undecodable event line", extra={"node": self.node,
                                                         "line": line[:200]})
            return
        if not isinstance(ev, dict):
            return
        if ev.get("type") == "heartbeat":
            return
        seq = ev.get("seq")
        if isinstance(seq, int):
            self.seq = seq
        self.events += 1
        self.on_event(self.node, ev)
