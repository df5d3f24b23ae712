"""`twinvol status`: the whole cluster on one screen, with a verdict and an exit code that
monitoring can use (0 healthy, 1 degraded, 2 down). The judging is in twinvol.health."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from twinvol.cli.common import (
    CliError,
    ClusterOpt,
    JsonOpt,
    api,
    call_json,
    console,
    emit_json,
    load_cluster,
)
from twinvol.cluster import ClusterConfig
from twinvol.health import Judgement, Seen, judge
from twinvol.sizes import human_size

_COLOUR = {"healthy": "bold green", "degraded": "bold yellow", "down": "bold red",
           "up": "green", "down-node": "red", "mirrored": "green", "mirror": "green",
           "block": "yellow", "local": "yellow", "idle": "white", "blocked": "yellow",
           "mismatch": "red", "absent": "red", "error": "red", "critical": "bold red",
           "warning": "yellow"}
TIMEOUT = 3.0


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(cfg: ClusterConfig, node: str, path: str) -> dict[str, Any]:
    try:
        return dict(api(cfg, node, "GET", path, timeout=TIMEOUT))
    except CliError as e:
        return {"error": str(e)}


def _component(cfg: ClusterConfig, addr: Any, path: str, what: str) -> dict[str, Any] | None:
    if not isinstance(addr, str):
        return None
    try:
        return dict(call_json(cfg, cfg.service_url(addr) + path, "GET", None, TIMEOUT,
                              prefix=f"{what}: ",
                              unreachable=f"{what} ({{url}}) is not reachable: {{reason}}")
                    or {})
    except CliError as e:
        return {"error": str(e)}


class FaultFeed:
    """Each node's fault log, read whole once and then only from where it was (`since`),
    so `--watch` and the dashboard do not fetch thousands of old reports every second.
    A node whose log id changes (a new data directory) is read whole again."""

    KEEP = 500  # reports kept per node

    def __init__(self) -> None:
        self.logs: dict[str, tuple[str, int, list[dict[str, Any]]]] = {}

    def fetch(self, cfg: ClusterConfig, node: str) -> list[dict[str, Any]]:
        log, lseq, reports = self.logs.get(node, ("", 0, []))
        ans = _get(cfg, node, f"/api/v1/faults?since={lseq}")
        if "error" in ans:
            return reports
        if log and ans.get("log") != log:
            self.logs.pop(node, None)
            return self.fetch(cfg, node)
        reports = (reports + [i["report"] for i in ans.get("faults", []) if "report" in i])
        self.logs[node] = (str(ans.get("log", "")), int(ans.get("lseq", 0)),
                           reports[-self.KEEP:])
        return self.logs[node][2]


def gather(cfg: ClusterConfig, feed: FaultFeed | None = None) -> Seen:
    """Ask every component at once (a dead one costs one timeout, not one per call)."""
    feed = feed or FaultFeed()
    with ThreadPoolExecutor(max_workers=8) as pool:
        nodes_f = {n: pool.submit(_get, cfg, n, "/api/v1/node") for n in cfg.nodes}
        pairs_f = {n: pool.submit(_get, cfg, n, "/api/v1/pairs") for n in cfg.nodes}
        faults_f = {n: pool.submit(feed.fetch, cfg, n) for n in cfg.nodes}
        host_f = pool.submit(_component, cfg, (cfg.host or {}).get("api"), "/api/v1/status",
                             "host agent")
        witness_f = pool.submit(_component, cfg, (cfg.witness or {}).get("addr"),
                                "/api/v1/health", "witness")
        nodes = {n: f.result() for n, f in nodes_f.items()}
        pairs: dict[str, dict[str, dict[str, Any]]] = {}
        for n, f in pairs_f.items():
            for view in f.result().get("pairs", []):
                pairs.setdefault(view["name"], {})[n] = view
        faults = [r for f in faults_f.values() for r in f.result()]
        witness = witness_f.result()
        if witness is None and cfg.witness:
            witness = {"state": "configured"}  # another kind of witness: not probed here
        return Seen(nodes=nodes, pairs=pairs, host=host_f.result(), witness=witness,
                    faults=faults, now=time.time())


def as_json(seen: Seen, j: Judgement) -> dict[str, Any]:
    return {"verdict": j.verdict.value, "exit_code": j.verdict.exit_code, "time": utc(seen.now),
            "reasons": j.reasons, "nodes": seen.nodes, "pairs": j.pairs,
            "host": seen.host, "witness": seen.witness, "faults": j.faults}


def render(cfg: ClusterConfig, seen: Seen, j: Judgement) -> RenderableType:
    v = j.verdict.value
    head = Text.assemble((f"twinvol {cfg.cluster.name}: ", "bold"), (v.upper(), _COLOUR[v]),
                         f"  ({utc(seen.now)})")
    parts: list[RenderableType] = [head]
    parts += [Text(f"- {r}", style=_COLOUR[v]) for r in j.reasons]
    nodes = Table("node", "site", "state", "pid", "volumes", "conns", "free", title="nodes",
                  title_justify="left")
    for n, s in seen.nodes.items():
        if "error" in s:
            nodes.add_row(n, cfg.node(n).site, "[red]down[/]", "-", "-", "-", "-")
        else:
            nodes.add_row(n, s["site"], "[green]up[/]", str(s["pid"]), str(s["volumes"]),
                          str(s["connections"]), human_size(s["capacity"]["free"]))
    parts.append(nodes)
    if j.pairs:
        pairs = Table("pair", "mode", "nodes", "state", "serving", "progress", "lag",
                      title="pairs", title_justify="left")
        for p in j.pairs.values():
            state = p["state"] or "?"
            pairs.add_row(p["name"], p["mode"], " ".join(p["nodes"]),
                          f"[{_COLOUR.get(state, 'yellow')}]{state}[/]",
                          " ".join(p["serving"]) or "[red]none[/]",
                          "" if p["progress"] is None else f"{p['progress']}%",
                          "" if p["lag_seconds"] is None else f"{p['lag_seconds']:.1f}s")
        parts.append(pairs)
    if seen.host is not None:
        if "error" in seen.host:
            parts.append(Text(f"host agent: down: {seen.host['error']}", style="red"))
        else:
            paths = Table("export", "node", "path", "io mode", "held", title="host paths",
                          title_justify="left")
            for export, ex in sorted(seen.host.get("exports", {}).items()):
                for node, p in sorted(ex.get("paths", {}).items()):
                    paths.add_row(export, node, f"[{_COLOUR.get(p['state'], 'white')}]"
                                  f"{p['state']}[/]", p.get("io_mode") or "-", str(ex["held"]))
            parts.append(paths if paths.row_count else
                         Text("host paths: none yet (no host has opened a volume through the "
                              "host agent)"))
    if seen.witness is not None:
        w = seen.witness
        said = f"down: {w['error']}" if "error" in w else w.get("status", w.get("state", "ok"))
        parts.append(Text(f"witness: {said}", style="red" if "error" in w else "green"))
    if j.faults:
        faults = Table("time", "severity", "node", "kind", "subject", "description",
                       title="open faults", title_justify="left")
        for f in j.faults:
            colour = _COLOUR.get(f["severity"], "white")
            faults.add_row(utc(float(f.get("time", 0)))[11:], f"[{colour}]{f['severity']}[/]",
                           f.get("origin", ""), f.get("kind", ""), f.get("subject", ""),
                           f.get("description", ""))
        parts.append(faults)
    return Group(*parts)


def status(
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
    watch: bool = typer.Option(False, "--watch", "-w",
                               help="Refresh until Ctrl-C (with --json: one object a line)."),
    interval: float = typer.Option(2.0, "--interval", min=0.2,
                                   help="Seconds between refreshes with --watch."),
) -> None:
    """One screen: nodes, pairs (state, lag, progress), host paths, witness, open faults and
    a verdict. Exit 0 healthy, 1 degraded, 2 down."""
    cfg = load_cluster(cluster)
    feed = FaultFeed()
    seen = gather(cfg, feed)
    j = judge(seen)
    if not watch:
        if json_out:
            emit_json(as_json(seen, j))
        else:
            console.print(render(cfg, seen, j))
        raise typer.Exit(j.verdict.exit_code)
    try:
        if json_out:
            while True:
                emit_json(as_json(seen, j))
                time.sleep(interval)
                seen = gather(cfg, feed)
                j = judge(seen)
        with Live(render(cfg, seen, j), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                seen = gather(cfg, feed)
                j = judge(seen)
                live.update(render(cfg, seen, j), refresh=True)
    except KeyboardInterrupt:
        pass
    raise typer.Exit(j.verdict.exit_code)
