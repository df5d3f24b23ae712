"""The host agent's side of fault relay: follow the path nodes' pushed fault logs, take
each report once (dedup and order by origin stream), log it, hand it to the sinks and
serve it to `twinvol events`.

The host never talks to nodes it has no path to: reports of such nodes (a far site)
reach it through a path node's log. Every received report is appended to the host's
fault log (JSON lines), which also rebuilds the dedup watermarks after a restart, so a
node replaying its log from the start does not deliver anything twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from twinvol.faults.logic import Watermarks
from twinvol.faults.model import FaultReport, path_text
from twinvol.faults.sinks import SinkConfig, SinkWorker
from twinvol.httpapi import follow_lines

log = logging.getLogger("twinvol.host.faults")

HOST_HOP = "host"
RECENT = 10000
SILENCE = 6.0
MAX_LOG = 16 << 20  # the fault log is rotated (one old copy kept) past this size
HEARTBEAT = 2.0


class Inbox:
    """Sans-IO: which received reports are new, their host numbering, recent ones."""

    def __init__(self, recent: int = RECENT) -> None:
        self.marks = Watermarks()
        self.recent: collections.deque[tuple[int, FaultReport]] = collections.deque(
            maxlen=recent)
        self.hseq = 0
        self.duplicates = 0

    def receive(self, report: FaultReport, now: float) -> tuple[int, FaultReport] | None:
        if not self.marks.accept(report):
            self.duplicates += 1
            return None
        self.hseq += 1
        entry = (self.hseq, report.via(HOST_HOP, round(now, 6)))
        self.recent.append(entry)
        return entry

    def restore(self, report: FaultReport) -> None:
        """A report read back from the host's fault log at start."""
        if self.marks.accept(report):
            self.hseq += 1
            self.recent.append((self.hseq, report))

    def since(self, hseq: int) -> list[tuple[int, FaultReport]]:
        return [e for e in self.recent if e[0] > hseq]


class StreamStats:
    """What following one node's fault log cost the host (for bench/faults.py)."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.faults = 0
        self.connects = 0


class FaultWatcher:
    """Follows one node's GET /api/v1/faults?follow=1 and resumes after the last entry."""

    def __init__(self, node: str, base: str, session: aiohttp.ClientSession,
                 headers: dict[str, str], on_report: Any) -> None:
        self.node = node
        self.url = base + "/api/v1/faults"
        self.session = session
        self.headers = headers
        self.on_report = on_report
        self.cursor = 0
        self.log_id: str | None = None
        self.up = False
        self.error: str | None = None
        self.stats = StreamStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"faults-{self.node}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)

    def status(self) -> dict[str, Any]:
        return {"state": "up" if self.up else "down", "cursor": self.cursor,
                "error": self.error, "messages": self.stats.messages,
                "bytes": self.stats.bytes, "faults": self.stats.faults,
                "connects": self.stats.connects}

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self.error = f"no fault log line or heartbeat for {SILENCE:g} s"
            except (aiohttp.ClientError, OSError, ValueError) as e:
                self.error = f"{type(e).__name__}: {e}"
            if self.up:
                log.warning("fault stream lost", extra={"node": self.node, "error": self.error})
            self.up = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _follow(self) -> None:
        async with self.session.get(
                self.url, params={"follow": "1", "since": str(self.cursor)},
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=3.0)) as resp:
            if resp.status != 200:
                raise OSError(f"fault stream answered HTTP {resp.status}")
            self.stats.connects += 1
            while True:
                line = await asyncio.wait_for(resp.content.readline(), SILENCE)
                if not line:
                    raise OSError("fault stream ended")
                self.stats.messages += 1
                self.stats.bytes += len(line)
                if self._line(line):
                    return  # reconnect from the new cursor

    def _line(self, line: bytes) -> bool:
        try:
            msg = msgspec.json.decode(line)
        except msgspec.DecodeError:
            log.warning("undecodable fault stream line", extra={"node": self.node})
            return False
        if not isinstance(msg, dict):
            return False
        kind = msg.get("type")
        if kind == "hello":
            log_id, last = msg.get("log"), msg.get("lseq")
            if (self.log_id is not None and log_id != self.log_id) or (
                    isinstance(last, int) and last < self.cursor):
                log.warning("node fault log was reset; reading it from the start",
                            extra={"node": self.node})
                self.log_id, self.cursor = str(log_id), 0
                return True
            self.log_id = str(log_id)
            self.up = True
            self.error = None
            return False
        if kind != "fault":
            return False
        lseq = msg.get("lseq")
        try:
            report = msgspec.convert(msg.get("report"), FaultReport)
        except msgspec.ValidationError as e:
            log.warning("malformed fault report refused", extra={"node": self.node,
                                                                 "error": str(e)})
            return False
        if isinstance(lseq, int):
            self.cursor = max(self.cursor, lseq)
        self.stats.faults += 1
        self.on_report(self.node, report)
        return False


class HostFaults:
    """Everything fault-related in the host agent."""

    def __init__(self, log_path: str, sinks: list[SinkConfig], cluster: str) -> None:
        self.log_path = log_path
        self.sink_configs = sinks
        self.cluster = cluster
        self.inbox = Inbox()
        self.watchers: dict[str, FaultWatcher] = {}
        self.sinks: list[SinkWorker] = []
        self.subscribers: set[asyncio.Queue[tuple[int, FaultReport] | None]] = set()
        self._log_file: Any = None
        self._load()

    def _load(self) -> None:
        for path in (self.log_path + ".1", self.log_path):
            try:
                with open(path, "rb") as f:
                    for line in f:
                        with contextlib.suppress(msgspec.DecodeError):
                            self.inbox.restore(msgspec.json.decode(line, type=FaultReport))
            except FileNotFoundError:
                continue

    def start(self, session: aiohttp.ClientSession, nodes: dict[str, str],
              headers: dict[str, str]) -> None:
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self.sinks = [SinkWorker(c, self.cluster, session) for c in self.sink_configs]
        for s in self.sinks:
            s.start()
        for name, base in nodes.items():
            w = FaultWatcher(name, base, session, headers, self.on_report)
            self.watchers[name] = w
            w.start()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.watchers.values()),
                             *(s.stop() for s in self.sinks))
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def on_report(self, via: str, report: FaultReport) -> None:
        entry = self.inbox.receive(report, time.time())
        if entry is None:
            return
        _, r = entry
        self._append(r)
        log.warning("fault received", extra={"via": via, "path": path_text(r),
                                             "fault": msgspec.to_builtins(r)})
        for s in self.sinks:
            s.offer(r)
        for q in list(self.subscribers):
            try:
                q.put_nowait(entry)
            except asyncio.QueueFull:
                self.subscribers.discard(q)

    def _append(self, report: FaultReport) -> None:
        f = self._log_file
        if f is None:
            return
        f.write(msgspec.json.encode(report) + b"\n")
        f.flush()
        if f.tell() > MAX_LOG:
            f.close()
            os.replace(self.log_path, self.log_path + ".1")
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115

    def status(self) -> dict[str, Any]:
        return {"received": self.inbox.hseq, "duplicates": self.inbox.duplicates,
                "gaps": self.inbox.marks.gaps, "log": self.log_path,
                "streams": {n: w.status() for n, w in self.watchers.items()},
                "sinks": [s.status() for s in self.sinks]}

    def routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/api/v1/faults")
        async def faults(request: web.Request) -> web.StreamResponse:
            try:
                since = int(request.query.get("since", "0"))
            except ValueError:
                return web.json_response({"error": {"code": "invalid",
                                                     "message": "since must be an integer"}},
                                         status=400)
            if request.query.get("follow", "") not in ("1", "true", "yes"):
                return web.json_response({
                    "hseq": self.inbox.hseq, "status": self.status(),
                    "faults": [{"hseq": n, "report": msgspec.to_builtins(r)}
                               for n, r in self.inbox.since(since)]})
            q: asyncio.Queue[tuple[int, FaultReport] | None] = asyncio.Queue(4096)
            self.subscribers.add(q)
            try:
                return await follow_lines(
                    request, q, self.inbox.since(since), number=lambda t: t[0],
                    encode=lambda t: _line(*t), every=HEARTBEAT, after=since,
                    heartbeat=lambda: b'{"type": "heartbeat", "hseq": %d}\n'
                    % self.inbox.hseq)
            finally:
                self.subscribers.discard(q)

        return routes


def _line(hseq: int, report: FaultReport) -> bytes:
    return msgspec.json.encode({"type": "fault", "hseq": hseq, "report": report}) + b"\n"


__all__ = ["FaultWatcher", "HostFaults", "Inbox", "StreamStats"]
