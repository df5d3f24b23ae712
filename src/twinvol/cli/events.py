"""`twinvol events`: the fault reports the host agent received (pushed by the nodes), or
with --node one node's event stream."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.table import Table

from twinvol.cli.common import (
    CliError,
    ClusterOpt,
    JsonOpt,
    NodeOpt,
    api,
    auth_headers,
    check_node,
    console,
    emit_json,
    load_cluster,
)
from twinvol.cluster import ClusterConfig

_STYLE = {"critical": "bold red", "error": "red", "warning": "yellow", "info": "green"}


def _host_url(cfg: ClusterConfig) -> str:
    host = cfg.host or {}
    addr = host.get("api")
    if not isinstance(addr, str):
        raise CliError(f"cluster file {cfg.path} has no [host] api address; the host agent "
                       "receives the fault reports (or use --node NAME for a node's events)")
    return cfg.service_url(addr)


def _open(url: str, headers: dict[str, str], what: str, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        raise CliError(f"{what} answered HTTP {e.code} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"{what} ({url}) is not reachable: {getattr(e, 'reason', e)}; is it "
                       "running (`twinvol host run` or `twinvol up`)?") from None


def _when(t: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(t))) + f".{int(t * 1000) % 1000:03d}"
    except (TypeError, ValueError):
        return "?"


def _path(r: dict[str, Any]) -> str:
    return " -> ".join(str(h.get("node")) for h in r.get("path") or [] if isinstance(h, dict))


def _fault_line(r: dict[str, Any]) -> str:
    sev = str(r.get("severity"))
    style = _STYLE.get(sev, "")
    count = f" x{r['count']}" if r.get("count", 1) > 1 else ""
    return (f"{_when(r.get('time'))} [{style}]{sev:<8}[/] {r.get('origin')}/{r.get('site')} "
            f"{r.get('component')}/{r.get('kind')} {r.get('state')}{count}: "
            f"{r.get('description')}  [dim](via {_path(r)}; {r.get('id')})[/]")


def _event_line(e: dict[str, Any]) -> str:
    rest = {k: v for k, v in e.items() if k not in ("seq", "time", "node", "site", "type")}
    return f"{_when(e.get('time'))} {e.get('node')} #{e.get('seq')} {e.get('type')} " + \
        " ".join(f"{k}={v}" for k, v in rest.items())


def events(
    follow: bool = typer.Option(False, "--follow", "-f",
                                help="Keep printing reports as they are pushed."),
    node: str | None = NodeOpt,
    since: int = typer.Option(0, "--since", help="Only entries numbered after this."),
    cluster: str | None = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Fault reports received by the host agent (from every node, relayed where the host
    has no path), or with --node the raw event stream of one node."""
    cfg = load_cluster(cluster)
    if node is not None:
        cfg.node(node)
        if not follow:
            body = api(cfg, node, "GET", f"/api/v1/events?since={since}")
            if json_out:
                emit_json(body)
            else:
                for e in body["events"]:
                    console.print(_event_line(e), highlight=False, markup=False)
            return
        headers = {"Authorization": f"Bearer {cfg.cluster.secret}"} if cfg.cluster.secret \
            else {}
        url = cfg.node(node).api_url + f"/api/v1/events?follow=1&since={since}"
        stream = _open(url, headers, f"node {node}", 10)
        try:
            check_node(node, url, stream.headers)
        except CliError:
            stream.close()
            raise
        key, show = "seq", _event_line
    else:
        base = _host_url(cfg)
        if not follow:
            with _open(f"{base}/api/v1/faults?since={since}", auth_headers(cfg), "the host agent",
                       10) as r:
                body = json.loads(r.read())
            if json_out:
                emit_json(body)
                return
            _table(body["faults"])
            return
        stream = _open(f"{base}/api/v1/faults?follow=1&since={since}", auth_headers(cfg),
                       "the host agent", 10)
        key, show = "hseq", None
    with stream:
        while True:
            try:
                line = stream.readline()
            except (TimeoutError, OSError) as e:
                raise CliError(f"the event stream broke: {e}") from None
            if not line:
                raise CliError("the event stream ended (the host agent or node stopped)")
            msg = json.loads(line)
            if msg.get("type") in ("heartbeat", "hello") or key not in msg:
                continue
            if json_out:
                sys.stdout.write(json.dumps(msg) + "\n")
                sys.stdout.flush()
            elif show is None:
                console.print(_fault_line(msg["report"]), highlight=False)
            else:
                console.print(show(msg), highlight=False, markup=False)


def _table(entries: list[dict[str, Any]]) -> None:
    if not entries:
        console.print("no fault reports received")
        return
    t = Table(box=None, header_style="bold")
    for col in ("time", "severity", "origin", "component", "state", "path"):
        t.add_column(col, no_wrap=True)
    t.add_column("description", overflow="fold", ratio=1)
    for e in entries:
        r = e["report"]
        sev = str(r.get("severity"))
        count = f" (x{r['count']})" if r.get("count", 1) > 1 else ""
        t.add_row(_when(r.get("time")), f"[{_STYLE.get(sev, '')}]{sev}[/]",
                  f"{r.get('origin')} ({r.get('site')})", f"{r.get('component')}/{r.get('kind')}",
                  str(r.get("state")), _path(r), f"{r.get('description')}{count}")
    console.print(t)
