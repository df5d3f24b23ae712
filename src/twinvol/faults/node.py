"""The node's fault manager: detectors, the outbox, the relay to host-facing nodes, and
the log that host agents follow.

Every node numbers its own reports and keeps them in its outbox. A relay task sends
them to the node chosen by `choose_route` (itself when a host listens to it, else a
host-facing node a host listens to) from that node's watermark, so a relay that
missed reports (link down, newly chosen) gets exactly what it lacks; the receiving
node drops what it already has (dedup by seq per origin stream) and appends the rest
to its log, which hosts follow. Probes run beside the sender, one task per
candidate, so a dead candidate never delays a report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from twinvol import clock
from twinvol.cluster import ClusterConfig
from twinvol.faults.detectors import from_event
from twinvol.faults.logic import (
    Flapping,
    Outbox,
    RateLimiter,
    RelayView,
    Threshold,
    Watermarks,
    choose_route,
)
from twinvol.faults.model import (
    FaultDraft,
    FaultReport,
    Hop,
    RelayAnswer,
    RelayBatch,
    make_id,
)
from twinvol.faults.store import FaultStore
from twinvol.sizes import parse_size
from twinvol.tls.context import api_contexts

log = logging.getLogger("twinvol.faults")

BATCH = 500
PROBE_INTERVAL = 1.0
SEND_TIMEOUT = 2.0
QUEUE = 4096
TICK = 0.25

_active: FaultManager | None = None


def report(component: str, kind: str, severity: str, description: str, *, action: str = "",
           subject: str = "") -> None:
    """Raise a fault on this node from anywhere in the node process (e.g. the journal:
    `faults.report("journal", "journal_overflow", "critical", "...")`). Safe to call
    before the node started (then it is only logged)."""
    draft = msgspec.convert({"component": component, "kind": kind, "severity": severity,
                             "description": description, "action": action,
                             "subject": subject}, FaultDraft)
    if _active is None:
        log.warning("fault raised with no fault manager running",
                    extra={"fault": msgspec.to_builtins(draft)})
        return
    _active.raise_fault(draft)


class BadReport(Exception):
    """A relay batch that is malformed or inconsistent (refused and counted)."""


class FaultManager:
    def __init__(self, cluster: ClusterConfig, name: str, data_dir: str,
                 subscribe_events: Callable[[Callable[[dict[str, Any]], None]], None]
                 ) -> None:
        self.cluster = cluster
        self.name = name
        self.site = cluster.node(name).site
        self.data_dir = data_dir
        self.cfg = cluster.fault_config(name)
        self.quota = (None if self.cfg.capacity_quota is None
                      else parse_size(str(self.cfg.capacity_quota)))
        self.secret = cluster.cluster.secret
        self.store = FaultStore(data_dir, self.cfg.retention)
        self.incarnation = self.store.incarnation
        self.stream = f"{name}/{self.incarnation}"
        self.outbox = Outbox(self.cfg.retention)
        for r in self.store.outbox():
            self.outbox.append(r)
        self.log: collections.deque[tuple[int, FaultReport]] = collections.deque(
            self.store.log(), maxlen=self.cfg.retention)
        self.lseq = self.store.last_lseq()
        self.marks = Watermarks(self.store.marks())
        self.limiter = RateLimiter(self.cfg.rate_burst, self.cfg.rate_window)
        self.flapping = Flapping(self.cfg.flap_count, self.cfg.flap_window)
        self.capacity = Threshold(self.cfg.capacity_warn, self.cfg.capacity_critical)
        host = cluster.host or {}
        names = host.get("nodes") if isinstance(host.get("nodes"), list) else None
        self.candidates: list[str] = ([str(n) for n in names] if names is not None
                                      else list(cluster.nodes) if cluster.host else [])
        self.views = {c: RelayView() for c in self.candidates if c != name}
        self.route: str | None = None
        self.open: set[tuple[str, str, str]] = set()  # raised and not cleared since
        self.subscribers: set[asyncio.Queue[tuple[int, FaultReport] | None]] = set()
        self.counters: dict[str, int] = collections.defaultdict(int)
        self.raised: dict[tuple[str, str], int] = collections.defaultdict(int)
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: aiohttp.ClientSession | None = None
        subscribe_events(self.on_event)

    # ---- raising -------------------------------------------------------------------

    def raise_fault(self, draft: FaultDraft) -> None:
        """Rate-limit, number, persist and queue a fault of this node."""
        if not draft.time:
            draft.time = clock.wall()
        # A clear only means something after a raise of the same fault (no "link up"
        # report for every link coming up at start).
        if draft.state == "cleared":
            if draft.key() not in self.open:
                return
            self.open.discard(draft.key())
        elif draft.severity != "info":
            self.open.add(draft.key())
        self._emit(self.limiter.offer(draft, clock.monotonic()))

    def _emit(self, drafts: list[FaultDraft]) -> None:
        if not drafts:
            return
        seq = self.outbox.last_seq
        reports = []
        for d in drafts:
            seq += 1
            reports.append(FaultReport(
                id=make_id(self.name, self.incarnation, seq), origin=self.name, site=self.site,
                incarnation=self.incarnation, seq=seq, component=d.component, kind=d.kind,
                severity=d.severity, state=d.state, time=round(d.time, 6), subject=d.subject,
                description=d.description, action=d.action, count=d.count,
                first_time=d.first_time, path=[Hop(self.name, round(clock.wall(), 6))]))
        self.store.add_own(reports)
        for r in reports:
            self.outbox.append(r)
            self.raised[(r.component, r.severity)] += 1
            log.warning("fault", extra={"fault": msgspec.to_builtins(r)})
        self.counters["raised"] += len(reports)
        self._kick()

    def on_event(self, ev: dict[str, Any]) -> None:
        """EventBus listener: turn state changes into faults."""
        try:
            draft = from_event(ev)
        except (msgspec.ValidationError, ValueError, KeyError):
            log.exception("event could not be turned into a fault", extra={"event": ev})
            return
        if draft is None:
            return
        self.raise_fault(draft)
        if ev.get("type") == "peer_down" and self.flapping.down(draft.subject,
                                                                clock.monotonic()):
            self.raise_fault(FaultDraft(
                component="peer_link", kind="peer_link_flapping", severity="error",
                subject=draft.subject,
                description=f"peer link {self.name} -> {draft.subject} went down "
                            f"{self.flapping.count} times within {self.flapping.window:g} s",
                action="the link is unstable: check the network path (MTU, duplex, a "
                       "failing switch port) before it breaks a pair for good"))

    def on_io_error(self, op: str, export: str, offset: int, exc: BaseException) -> None:
        """NBD layer hook: a backing storage operation failed."""
        short = "short write" in str(exc)
        en = getattr(exc, "errno", None)
        self.raise_fault(FaultDraft(
            component="disk", kind="short_write" if short else "io_error",
            severity="critical" if en == errno.ENOSPC else "error", subject=export,
            description=f"{op} at offset {offset} of export {export!r} on node {self.name} "
                        f"failed: {getattr(exc, 'strerror', None) or exc}",
            action="check the backing device or file system (dmesg, SMART, free space); "
                   "hosts use the partner copy if the volume is paired"))

    def on_slow_io(self, op: str, export: str, seconds: float) -> None:
        if seconds >= self.cfg.slow_io:
            self.raise_fault(FaultDraft(
                component="disk", kind="slow_io", severity="warning", subject=export,
                description=f"{op} on export {export!r} took {seconds:.3f} s on node "
                            f"{self.name} (threshold {self.cfg.slow_io:g} s)",
                action="check the disk's latency and what else uses it"))

    # ---- detectors run on a timer ---------------------------------------------------------

    def check_capacity(self) -> None:
        st = os.statvfs(self.data_dir)
        total = st.f_blocks * st.f_frsize
        fs_used = 1.0 - st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        used_frac, what = fs_used, (f"its file system is {fs_used:.0%} full "
                                    f"({(total - st.f_bavail * st.f_frsize) >> 20} MiB of "
                                    f"{total >> 20} MiB)")
        if self.quota:
            # With a quota the data directory has min(quota, what it uses + what the file
            # system still has) to itself; the file system's own fill does not matter.
            used = dir_usage(self.data_dir)
            room = min(self.quota, used + st.f_bavail * st.f_frsize)
            used_frac = used / room if room else 1.0
            what = (f"it uses {used_frac:.0%} of its quota ({used >> 20} MiB of "
                    f"{room >> 20} MiB)")
        level = self.capacity.update(used_frac)
        if level is None:
            return
        if level == "ok":
            draft = FaultDraft(component="capacity", kind="capacity_low", severity="info",
                               state="cleared", subject=self.name,
                               description=f"data directory of node {self.name} has room "
                                           f"again: {what}")
        else:
            draft = FaultDraft(component="capacity", kind="capacity_low",
                               severity="warning" if level == "warning" else "critical",
                               subject=self.name,
                               description=f"data directory {self.data_dir} of node "
                                           f"{self.name} is running out of space: {what}",
                               action="free space, grow the file system or raise the quota; "
                                      "writes to thin volumes fail with ENOSPC when it is full")
        self.raise_fault(draft)

    def _probe_disk(self) -> float:
        path = os.path.join(self.data_dir, "faults-probe")
        t0 = clock.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"\0" * 4096, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return clock.monotonic() - t0

    async def _detect(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = next_probe = 0.0
        while True:
            now = loop.time()
            self._emit(self.limiter.tick(clock.monotonic()))
            if now >= next_check:
                next_check = now + self.cfg.check_interval
                try:
                    self.check_capacity()
                except OSError as e:
                    log.warning("capacity check failed", extra={"error": str(e)})
            if now >= next_probe:
                next_probe = now + max(5.0, self.cfg.check_interval)
                try:
                    took = await loop.run_in_executor(None, self._probe_disk)
                    self.on_slow_io("probe write+fdatasync", "(data directory)", took)
                except OSError as e:
                    self.on_io_error("probe write", "(data directory)", 0, e)
            await asyncio.sleep(min(TICK, self.cfg.check_interval))

    # ---- the log hosts follow -----------------------------------------------------------

    def ingest(self, batch: RelayBatch) -> RelayAnswer:
        """Take a relay batch (from another node, or this node's own outbox)."""
        if batch.origin not in self.cluster.nodes:
            raise BadReport(f"origin {batch.origin!r} is not a node of this cluster")
        for r in batch.reports:
            if r.origin != batch.origin or r.stream != batch.stream:
                raise BadReport(f"report {r.id} is not of stream {batch.stream}")
        if batch.reports and any(b.seq <= a.seq for a, b in itertools.pairwise(batch.reports)):
            raise BadReport("reports of a batch must be in seq order")
        now = round(clock.wall(), 6)
        entries: list[tuple[int, FaultReport]] = []
        dups = 0
        for r in batch.reports:
            if not self.marks.accept(r):
                dups += 1
                continue
            self.lseq += 1
            entries.append((self.lseq, r if r.origin == self.name else r.via(self.name, now)))
        if entries:
            self.store.add_log(entries, {batch.stream: self.marks.get(batch.stream)})
            for e in entries:
                self.log.append(e)
                for q in list(self.subscribers):
                    try:
                        q.put_nowait(e)
                    except asyncio.QueueFull:
                        self.subscribers.discard(q)
            if batch.origin != self.name:
                self.counters["relayed_in"] += len(entries)
        self.counters["duplicates"] += dups
        return RelayAnswer(watermark=self.marks.get(batch.stream),
                           subscribers=len(self.subscribers), accepted=len(entries),
                           duplicates=dups)

    def refused(self, why: str, peer: str) -> None:
        self.counters["refused"] += 1
        log.warning("fault relay batch refused", extra={"reason": why, "peer": peer})

    def since(self, lseq: int) -> list[tuple[int, FaultReport]]:
        if lseq >= self.lseq:
            return []
        return [e for e in self.log if e[0] > lseq]

    def subscribe(self) -> asyncio.Queue[tuple[int, FaultReport] | None]:
        q: asyncio.Queue[tuple[int, FaultReport] | None] = asyncio.Queue(QUEUE)
        self.subscribers.add(q)
        self._kick()  # a host is listening now: the route may change
        return q

    def unsubscribe(self, q: asyncio.Queue[tuple[int, FaultReport] | None]) -> None:
        self.subscribers.discard(q)
        self._kick()

    # ---- relay ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _url(self, node: str) -> str:
        return self.cluster.node(node).api_url + "/api/v1/faults/relay"

    async def _post(self, node: str, reports: list[FaultReport]) -> RelayAnswer:
        assert self._http is not None
        body = msgspec.json.encode(RelayBatch(self.name, self.stream, reports))
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        async with self._http.post(self._url(node), data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT)) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}: {raw[:200]!r}")
            return msgspec.json.decode(raw, type=RelayAnswer)

    def _learn(self, node: str, ans: RelayAnswer | None, err: str = "") -> None:
        v = self.views[node]
        was = v.reachable
        if ans is None:
            v.reachable = False
            v.failures += 1
            if was:
                log.warning("fault relay candidate unreachable", extra={"relay": node,
                                                                        "error": err})
        else:
            v.reachable, v.subscribers, v.watermark, v.failures = \
                True, ans.subscribers, ans.watermark, 0
        if v.reachable != was:
            self._kick()

    async def _probe(self, node: str) -> None:
        while True:
            try:
                self._learn(node, await self._post(node, []))
            except (OSError, TimeoutError, aiohttp.ClientError, msgspec.DecodeError) as e:
                self._learn(node, None, str(e) or type(e).__name__)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _relay(self) -> None:
        assert self._wake is not None
        while True:
            route = choose_route(self.name, self.candidates, self.views,
                                 len(self.subscribers), self.route)
            if route != self.route:
                log.info("fault route", extra={"route": route, "previous": self.route})
                self.counters["route_changes"] += 1
                self.route = route
            if route == self.name or (route is None and not self.candidates):
                pending = self.outbox.after(self.marks.get(self.stream), BATCH)
                if pending:
                    self.ingest(RelayBatch(self.name, self.stream, pending))
                    continue
            elif route is not None:
                pending = self.outbox.after(self.views[route].watermark, BATCH)
                if pending:
                    try:
                        ans = await self._post(route, pending)
                    except (OSError, TimeoutError, aiohttp.ClientError,
                            msgspec.DecodeError) as e:
                        self._learn(route, None, str(e) or type(e).__name__)
                        continue
                    self._learn(route, ans)
                    self.counters["relayed_out"] += ans.accepted
                    continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL)

    def pending(self) -> int:
        """Own reports not yet at the current route."""
        if self.route is None:
            return self.outbox.pending(0) if self.candidates else 0
        if self.route == self.name:
            return self.outbox.pending(self.marks.get(self.stream))
        return self.outbox.pending(self.views[self.route].watermark)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        global _active
        self._wake = asyncio.Event()
        ssl_ctx = api_contexts(self.cluster, self.name)[1]  # HTTPS to peers' APIs
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)
                                           if ssl_ctx else None)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._relay(), name="faults-relay"),
                       loop.create_task(self._detect(), name="faults-detect")]
        self._tasks += [loop.create_task(self._probe(n), name=f"faults-probe-{n}")
                        for n in self.views]
        _active = self

    async def stop(self) -> None:
        global _active
        if _active is self:
            _active = None
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        self.subscribers.clear()
        if self._http is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http.close(), 1.0)
        self.store.close()

    def status(self) -> dict[str, Any]:
        return {"stream": self.stream, "route": self.route, "candidates": self.candidates,
                "relays": {n: {"reachable": v.reachable, "subscribers": v.subscribers,
                               "watermark": v.watermark} for n, v in self.views.items()},
                "own_last_seq": self.outbox.last_seq, "pending": self.pending(),
                "log_lseq": self.lseq, "subscribers": len(self.subscribers),
                "suppressed": self.limiter.suppressed_total, **self.counters}


def dir_usage(path: str) -> int:
    """Bytes allocated by the files under `path` (thin files count what they hold)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


__all__ = ["BadReport", "FaultManager", "dir_usage", "report"]
