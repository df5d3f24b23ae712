"""The web dashboard: a read-only page of the whole cluster that updates itself.

It shows what `twinvol status` judges (nodes, pairs with state, lag and copy progress,
host paths, witness, open faults, the verdict), the latest fault reports as they come,
and the hypervisor hosts with their VMs. One server-sent event stream carries a fresh
snapshot every `interval` seconds while a page is open, so a pair split from the CLI
appears without a reload. Read-only: it has no route that changes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from twinvol import __version__
from twinvol.cli.common import CliError, call_json
from twinvol.cli.status import FaultFeed, as_json, gather
from twinvol.cluster import ClusterConfig
from twinvol.health import judge

log = logging.getLogger("twinvol.dashboard")
RECENT_FAULTS = 30


def _vmhosts(cfg: ClusterConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, vh in cfg.vmhosts.items():
        try:
            host = call_json(cfg, vh.api_url + "/api/v1/host", "GET", None, 3.0,
                             prefix=f"hypervisor host {name}: ",
                             unreachable=f"hypervisor host {name} is not reachable: {{reason}}")
            vms = call_json(cfg, vh.api_url + "/api/v1/vms", "GET", None, 3.0,
                            prefix=f"hypervisor host {name}: ",
                            unreachable=f"hypervisor host {name} is not reachable: {{reason}}")
            out[name] = {"site": vh.site, "host": host, "vms": vms.get("vms", [])}
        except CliError as e:
            out[name] = {"site": vh.site, "error": str(e)}
    return out


def snapshot(cfg: ClusterConfig, feed: FaultFeed | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON object (blocking: run it in a thread)."""
    seen = gather(cfg, feed)
    out = as_json(seen, judge(seen))
    recent = sorted(seen.faults, key=lambda r: (r.get("time", 0.0), r.get("seq", 0)))
    out["recent_faults"] = recent[-RECENT_FAULTS:][::-1]
    out["vmhosts"] = _vmhosts(cfg)
    out["cluster"] = cfg.cluster.name
    out["version"] = __version__
    return out


class Dashboard:
    """Serves the page, `GET /api/v1/status` (one snapshot) and `GET /api/v1/stream`
    (server-sent events: a snapshot every `interval` seconds)."""

    def __init__(self, cfg: ClusterConfig, interval: float = 1.0) -> None:
        self.cfg = cfg
        self.interval = interval
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard")
        self.feed = FaultFeed()  # one thread uses it: the pool has one worker
        self._lock = asyncio.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None
        self.page = importlib.resources.files("twinvol.dashboard").joinpath(
            "page.html").read_text(encoding="utf-8")

    async def _snapshot(self) -> dict[str, Any]:
        """A snapshot at most half an interval old: open pages share one, so more viewers
        do not mean more load on the nodes."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._last is None or loop.time() - self._last[0] >= self.interval / 2:
                snap = await loop.run_in_executor(self.pool, snapshot, self.cfg, self.feed)
                self._last = (loop.time(), snap)
            return self._last[1]

    def app(self) -> web.Application:
        app = web.Application()
        r = web.RouteTableDef()

        @r.get("/")
        async def page(_: web.Request) -> web.Response:
            return web.Response(text=self.page, content_type="text/html", charset="utf-8")

        @r.get("/api/v1/health")
        async def health(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "component": "dashboard"})

        @r.get("/api/v1/status")
        async def status(_: web.Request) -> web.Response:
            return web.json_response(await self._snapshot())

        @r.get("/api/v1/stream")
        async def stream(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
                while True:
                    data = json.dumps(await self._snapshot())
                    await resp.write(f"event: status\ndata: {data}\n\n".encode())
                    await asyncio.sleep(self.interval)
            return resp

        app.add_routes(r)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _: web.Application) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run(cfg: ClusterConfig, host: str, port: int, interval: float) -> None:
    """Serve the dashboard in the foreground until SIGTERM/SIGINT."""
    log.info("dashboard serving", extra={"url": f"http://{host}:{port}/"})
    web.run_app(Dashboard(cfg, interval).app(), host=host, port=port, print=None,
                access_log=None, handle_signals=True)
