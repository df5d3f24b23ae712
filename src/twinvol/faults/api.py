"""The node's fault endpoints (added to the node API) and its Prometheus `/metrics`.

- `POST /api/v1/faults/relay`: a node hands reports of its stream to this node;
- `GET /api/v1/faults[?since=N][&follow=1]`: this node's fault log, or (follow) a JSON-lines
  stream of it that host agents keep open, with a heartbeat every 2 s;
- `GET /api/v1/faults/status`: route, relay candidates, pending reports, counters;
- `POST /api/v1/faults/test`: raise a test fault (to check sinks end to end);
- `GET /metrics`: Prometheus text format.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from twinvol import __version__
from twinvol.faults.model import Component, FaultDraft, FaultReport, RelayBatch, Severity
from twinvol.faults.node import BadReport
from twinvol.httpapi import follow_lines
from twinvol.nbd.iostats import BOUNDS, SAMPLE, IoStats
from twinvol.replication.core.types import PairState
from twinvol.replication.peer import PROTOCOL_ERRORS

if TYPE_CHECKING:
    from twinvol.node.node import Node

HEARTBEAT = 2.0


class TestFault(msgspec.Struct, forbid_unknown_fields=True):
    component: Component = "node"
    kind: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = "test"
    severity: Severity = "warning"
    description: Annotated[str, Meta(max_length=2000)] = "test fault raised by an operator"
    subject: Annotated[str, Meta(max_length=200)] = ""
    count: Annotated[int, Meta(ge=1, le=100000)] = 1  # >1: an event storm, rate-limited


def _err(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _line(lseq: int, report: FaultReport) -> bytes:
    return msgspec.json.encode({"type": "fault", "lseq": lseq, "report": report}) + b"\n"


def fault_routes(node: Node) -> web.RouteTableDef:
    routes = web.RouteTableDef()
    fm = node.faults
    batch_decoder = msgspec.json.Decoder(RelayBatch)

    @routes.post("/api/v1/faults/relay")
    async def relay(request: web.Request) -> web.Response:
        raw = await request.read()
        peer = request.remote or "?"
        try:
            batch = batch_decoder.decode(raw)
            if batch.origin == node.name:
                raise BadReport(f"a batch claiming to come from this node ({node.name})")
            ans = fm.ingest(batch)
        except (msgspec.DecodeError, BadReport) as e:
            fm.refused(str(e), peer)
            return _err(400, "invalid", f"fault report refused: {e}")
        return web.json_response(msgspec.to_builtins(ans))

    @routes.post("/api/v1/faults/test")
    async def test(request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=TestFault)
        except msgspec.DecodeError as e:
            return _err(400, "invalid", f"bad request body: {e}")
        before = fm.outbox.last_seq
        for i in range(body.count):
            fm.raise_fault(FaultDraft(component=body.component, kind=body.kind,
                                      severity=body.severity, subject=body.subject,
                                      description=body.description if body.count == 1
                                      else f"{body.description} #{i + 1}"))
            if i % 512 == 511:
                await asyncio.sleep(0)
        return web.json_response({"raised": body.count,
                                  "reported": fm.outbox.last_seq - before,
                                  "suppressed": fm.limiter.suppressed_total,
                                  "last_seq": fm.outbox.last_seq, "stream": fm.stream})

    @routes.get("/api/v1/faults/status")
    async def status(_: web.Request) -> web.Response:
        """Where this node's reports go (route, relays' watermarks) and its counters."""
        return web.json_response(fm.status())

    @routes.get("/api/v1/faults")
    async def faults(request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return _err(400, "invalid", "since must be an integer")
        if request.query.get("follow", "") not in ("1", "true", "yes"):
            return web.json_response({
                "log": fm.incarnation, "lseq": fm.lseq,
                "faults": [{"lseq": n, "report": msgspec.to_builtins(r)}
                           for n, r in fm.since(since)]})
        q = fm.subscribe()
        try:
            # The log id lets a follower notice a wiped data directory (numbering restarts).
            hello = msgspec.json.encode({"type": "hello", "node": node.name,
                                         "log": fm.incarnation, "lseq": fm.lseq}) + b"\n"
            return await follow_lines(
                request, q, fm.since(since), number=lambda t: t[0],
                encode=lambda t: _line(*t), first=hello, every=HEARTBEAT, after=since,
                heartbeat=lambda: b'{"type": "heartbeat", "lseq": %d}\n' % fm.lseq)
        finally:
            fm.unsubscribe(q)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))

    @routes.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; "
                                                     "charset=utf-8"})

    return routes


class NodeCollector(Collector):
    """Reads the node's plain counters at scrape time (nothing is counted per request
    through prometheus-client: the NBD path does one int increment)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Any:
        node, fm = self.node, self.node.faults
        labels = {"node": node.name, "site": node.config.site}
        ln, lv = list(labels), list(labels.values())
        info = GaugeMetricFamily("twinvol_build_info", "twinvol version (value 1)",
                                 labels=[*ln, "component", "version"])
        info.add_metric([*lv, "node", __version__], 1.0)
        yield info
        c = CounterMetricFamily("twinvol_nbd_requests", "NBD requests served (rate() = IOPS)",
                                labels=ln)
        c.add_metric(lv, node.io_stats.requests)
        yield c
        c = CounterMetricFamily("twinvol_nbd_errors", "NBD requests failed by backing storage",
                                labels=ln)
        c.add_metric(lv, node.io_stats.errors)
        yield c
        g = GaugeMetricFamily("twinvol_nbd_connections", "NBD client connections", labels=ln)
        g.add_metric(lv, len(node.connections))
        yield g
        c = CounterMetricFamily("twinvol_protocol_errors", "connections dropped for breaking "
                                "the protocol (NBD clients, peer links)", labels=[*ln, "port"])
        c.add_metric([*lv, "nbd"], node.io_stats.protocol_errors)
        c.add_metric([*lv, "peer"], PROTOCOL_ERRORS[node.name])
        yield c
        yield from _volume_metrics(node.io_stats, ln, lv)
        c = CounterMetricFamily("twinvol_faults_raised", "fault reports raised by this node",
                                labels=[*ln, "component", "severity"])
        for (comp, sev), n in sorted(fm.raised.items()):
            c.add_metric([*lv, comp, sev], n)
        yield c
        for name, doc in (("relayed_in", "reports relayed to this node by others"),
                          ("relayed_out", "own reports accepted by another node"),
                          ("refused", "malformed relay batches refused"),
                          ("duplicates", "relayed reports dropped as already held")):
            c = CounterMetricFamily(f"twinvol_faults_{name}", doc, labels=ln)
            c.add_metric(lv, fm.counters.get(name, 0))
            yield c
        c = CounterMetricFamily("twinvol_faults_suppressed",
                                "reports folded into summaries by the rate limit", labels=ln)
        c.add_metric(lv, fm.limiter.suppressed_total)
        yield c
        g = GaugeMetricFamily("twinvol_faults_pending", "own reports not yet at their relay",
                              labels=ln)
        g.add_metric(lv, fm.pending())
        yield g
        g = GaugeMetricFamily("twinvol_faults_subscribers", "host streams following this node",
                              labels=ln)
        g.add_metric(lv, len(fm.subscribers))
        yield g
        mgr = node.replication
        state = GaugeMetricFamily("twinvol_pair_state", "1 for the pair's current state",
                                  labels=[*ln, "pair", "state"])
        lag = GaugeMetricFamily("twinvol_pair_dirty_bytes",
                                "bytes the partner lacks (dirty chunks x chunk size)",
                                labels=[*ln, "pair"])
        link = GaugeMetricFamily("twinvol_pair_link_up", "1 when the pair's peer link is up",
                                 labels=[*ln, "pair"])
        copy_left = GaugeMetricFamily("twinvol_pair_copy_remaining_chunks",
                                      "chunks a running copy (initial, resync) still has to "
                                      "send; 0 when none runs", labels=[*ln, "pair"])
        copy_total = GaugeMetricFamily("twinvol_pair_copy_total_chunks",
                                       "chunks the running (or last) copy had to send",
                                       labels=[*ln, "pair"])
        for pr in list(mgr.pairs.values()):
            view = mgr.view(pr)
            for s in PairState:
                state.add_metric([*lv, pr.rec.name, s], 1.0 if view["state"] == s else 0.0)
            lag.add_metric([*lv, pr.rec.name],
                           float(view["dirty_chunks"]) * float(view["chunk_size"]))
            link.add_metric([*lv, pr.rec.name], 1.0 if view["peer_link"] == "up" else 0.0)
            c = view["copy"]
            copy_left.add_metric([*lv, pr.rec.name],
                                 float(c["remaining_chunks"]) if c["running"] else 0.0)
            copy_total.add_metric([*lv, pr.rec.name], float(c["total_chunks"] or 0))
        yield state
        yield lag
        yield link
        yield copy_left
        yield copy_total
        yield from _remote_metrics(mgr, ln, lv)
        st = os.statvfs(node.data_dir)
        g = GaugeMetricFamily("twinvol_capacity_bytes", "data directory file system space",
                              labels=[*ln, "kind"])
        g.add_metric([*lv, "total"], st.f_blocks * st.f_frsize)
        g.add_metric([*lv, "free"], st.f_bavail * st.f_frsize)
        yield g


def _volume_metrics(stats: IoStats, ln: list[str], lv: list[str]) -> Iterator[Any]:
    """Per volume (export name) and kind of request: count, bytes and service time (the
    request parsed to its reply queued) as a histogram."""
    labels = [*ln, "volume", "op"]
    reqs = CounterMetricFamily("twinvol_volume_requests", "NBD requests served",
                               labels=labels)
    nbytes = CounterMetricFamily("twinvol_volume_bytes", "bytes read or written",
                                 labels=labels)
    hist = HistogramMetricFamily("twinvol_volume_request_seconds",
                                 f"service time of NBD requests, 1 in {SAMPLE} timed (the "
                                 "count is of timed requests)", labels=labels)
    for export, vio in sorted(stats.volumes.items()):
        for op, s in (("read", vio.read), ("write", vio.write), ("other", vio.other)):
            lab = [*lv, export, op]
            reqs.add_metric(lab, s.count)
            nbytes.add_metric(lab, s.bytes)
            running, buckets = 0, []
            for bound, n in zip((*BOUNDS, float("inf")), s.buckets, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            hist.add_metric(lab, buckets, s.ns / 1e9)
    yield from (reqs, nbytes, hist)


def _remote_metrics(mgr: Any, ln: list[str], lv: list[str]) -> Iterator[GaugeMetricFamily]:
    """Each remote copy's lag and journal fill, so an operator can alert on the RPO."""
    labels = [*ln, "pair", "group", "group_role"]
    fams = {
        "seconds": GaugeMetricFamily("twinvol_remote_lag_seconds",
                                     "age of the oldest write the far copy lacks (RPO)",
                                     labels=labels),
        "sequences": GaugeMetricFamily("twinvol_remote_lag_writes",
                                       "writes the far copy has not applied", labels=labels),
        "bytes": GaugeMetricFamily("twinvol_remote_lag_bytes",
                                   "bytes the far copy lacks", labels=labels),
        "journal": GaugeMetricFamily("twinvol_journal_bytes", "journal bytes held",
                                     labels=labels),
        "fill": GaugeMetricFamily("twinvol_journal_fill_ratio",
                                  "journal bytes held / journal limit", labels=labels),
        "stale": GaugeMetricFamily("twinvol_remote_status_stale",
                                   "1 when this node has not heard from the feeder lately",
                                   labels=labels),
    }
    for pr in list(mgr.pairs.values()):
        if not pr.rec.remote:
            continue
        rc = mgr.remote.view(pr)
        if not rc:
            continue
        lv2 = [*lv, pr.rec.name, rc["group"], rc["group_role"]]
        for key in ("seconds", "sequences", "bytes"):
            fams[key].add_metric(lv2, float(rc["lag"][key]))
        fams["journal"].add_metric(lv2, float(rc["journal"]["bytes"]))
        fams["fill"].add_metric(lv2, float(rc["journal"]["fill"]))
        fams["stale"].add_metric(lv2, 1.0 if rc.get("stale") else 0.0)
    yield from fams.values()
