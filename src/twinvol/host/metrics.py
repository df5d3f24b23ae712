"""The host agent's Prometheus `/metrics`: per-path state and requests, held requests,
failovers, retries and request latency per export, read from its status document at
scrape time (nothing is counted per request for it but the sampled latency,
host/latency.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from twinvol import __version__
from twinvol.host.latency import BOUNDS, SAMPLE

PATH_STATES = ("up", "blocked", "mismatch", "absent", "down", "idle")
_EXPORT_COUNTERS = (  # status key, metric name (prometheus adds _total), help
    ("failovers", "failovers", "requests moved to another path after a path failed"),
    ("retries", "retries", "requests sent again"),
    ("held_total", "holds", "requests held while no path could take them"),
    ("hold_failed", "hold_failures", "held requests that failed when the hold timed out"),
    ("sessions_total", "sessions_opened", "host sessions opened"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HostCollector(Collector):
    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self) -> Iterator[Any]:
        st = self.report()
        info = GaugeMetricFamily("twinvol_build_info", "twinvol version (value 1)",
                                 labels=["component", "version"])
        info.add_metric(["host", __version__], 1.0)
        yield info
        state = GaugeMetricFamily("twinvol_host_path_state", "1 for the path's current state",
                                  labels=["export", "node", "state"])
        mode = GaugeMetricFamily("twinvol_host_path_io_mode",
                                 "1 for the I/O mode the node last reported for the path",
                                 labels=["export", "node", "io_mode"])
        reqs = CounterMetricFamily("twinvol_host_path_requests",
                                   "requests sent over the path", labels=["export", "node"])
        inflight = GaugeMetricFamily("twinvol_host_path_inflight",
                                     "requests in flight on the path", labels=["export", "node"])
        held = GaugeMetricFamily("twinvol_host_held_requests",
                                 "requests held now (no path can take them)", labels=["export"])
        sessions = GaugeMetricFamily("twinvol_host_sessions", "open host sessions",
                                     labels=["export"])
        counters = {k: CounterMetricFamily(f"twinvol_host_{name}", doc, labels=["export"])
                    for k, name, doc in _EXPORT_COUNTERS}
        latency = HistogramMetricFamily(
            "twinvol_host_request_seconds", "time from a client's request read to its reply "
            f"queued, through the nodes; 1 in {SAMPLE} timed (the count is of timed requests)",
            labels=["export", "op"])
        for export, ex in sorted(st.get("exports", {}).items()):
            for node, p in sorted(ex.get("paths", {}).items()):
                for s in PATH_STATES:
                    state.add_metric([export, node, s], 1.0 if p["state"] == s else 0.0)
                if p.get("io_mode"):
                    mode.add_metric([export, node, p["io_mode"]], 1.0)
                reqs.add_metric([export, node], float(p.get("requests", 0)))
                inflight.add_metric([export, node], float(p.get("inflight", 0)))
            held.add_metric([export], float(ex.get("held", 0)))
            sessions.add_metric([export], float(ex.get("sessions", 0)))
            for k, fam in counters.items():
                fam.add_metric([export], float(ex.get(k, 0)))
            for op, h in sorted((ex.get("latency") or {}).items()):
                running, buckets = 0, []
                for bound, n in zip((*BOUNDS, float("inf")), h["buckets"], strict=True):
                    running += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
                latency.add_metric([export, op], buckets, h["sum"])
        yield from (state, mode, reqs, inflight, held, sessions, *counters.values(), latency)
        g = GaugeMetricFamily("twinvol_host_connections", "client connections to the agent")
        g.add_metric([], float(st.get("connections", 0)))
        yield g
        g = GaugeMetricFamily("twinvol_host_node_events_up",
                              "1 while the agent follows the node's event stream",
                              labels=["node"])
        for node, n in sorted((st.get("nodes") or {}).items()):
            g.add_metric([node], 1.0 if n["events"]["state"] == "up" else 0.0)
        yield g


def exposition(report: Callable[[], dict[str, Any]]) -> Callable[[], bytes]:
    """A function that renders the metrics text (one registry per agent)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(report))
    return lambda: generate_latest(registry)
