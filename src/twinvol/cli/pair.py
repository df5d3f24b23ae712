"""`twinvol pair create|list|show|set|split|resync|swap|verify|delete`."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    UsageError,
    api,
    collect,
    console,
    emit_json,
    load_cluster,
    warn_unreachable,
)
from twinvol.cluster import ClusterConfig

app = typer.Typer(help="Pairs: two volumes kept identical (active-active).",
                  no_args_is_help=True)

WaitOpt = typer.Option(False, "--wait", help="Wait until the pair is mirrored, with progress.")
TimeoutOpt = typer.Option(3600.0, "--timeout", help="Give up waiting after this many seconds.")


def _side(text: str, default_volume: str) -> tuple[str, str]:
    node, _, vol = text.partition(":")
    if not node:
        raise UsageError(f"bad side {text!r}: use NODE or NODE:VOLUME")
    return node, vol or default_volume


def _find(cfg: ClusterConfig, name: str) -> list[tuple[str, dict[str, Any]]]:
    """Every node's view of pair `name` (reachable nodes only)."""
    views = []
    for n in cfg.nodes:
        try:
            views.append((n, api(cfg, n, "GET", f"/api/v1/pairs/{name}", timeout=5)))
        except ApiError as e:
            if e.status != 404:
                raise
        except CliError:
            continue
    if not views:
        raise CliError(f"pair {name!r} does not exist on any reachable node")
    return views


def _primary(cfg: ClusterConfig, name: str) -> tuple[str, dict[str, Any]]:
    views = _find(cfg, name)
    for n, v in views:
        if v["role"] == "primary" and v["io_mode"] != "block":
            return n, v
    for n, v in views:
        if v["role"] == "primary":
            return n, v
    return views[0]


def _wait(cfg: ClusterConfig, node: str, name: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the copy source until the pair is mirrored, showing a progress bar. Ctrl-C
    stops the waiting, not the copy, and says so."""
    try:
        return _poll(cfg, node, name, timeout, quiet)
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting (Ctrl-C); the copy of pair {name!r} goes on in node "
                       f"{node}: follow it with `twinvol pair show {name}` or `twinvol "
                       f"status`; `twinvol pair delete {name}` stops it", 130) from None


def _poll(cfg: ClusterConfig, node: str, name: str, timeout: float, quiet: bool
          ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    view = api(cfg, node, "GET", f"/api/v1/pairs/{name}")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} chunks"),
                  TextColumn("{task.fields[sent]}"), TimeRemainingColumn(),
                  console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task(f"copy {name}", total=max(1, view["copy"]["total_chunks"]),
                                 sent="")
        while view["state"] != "mirrored":
            if time.monotonic() > deadline:
                raise CliError(f"pair {name!r} is still {view['state']} after {timeout:.0f}s")
            if view["state"] == "suspended" and view.get("mode") == "local":
                raise CliError(f"local pair {name!r} is suspended: {view.get('reason', '')}")
            if view["state"] == "suspended" and "split brain" in view.get("reason", ""):
                raise CliError(f"pair {name!r}: {view['reason']}")
            c = view["copy"]
            total = max(1, c["total_chunks"])
            progress.update(task, total=total, completed=max(0, total - c["remaining_chunks"]),
                            sent=f"{c['bytes_sent'] / 2**20:.1f} MiB sent")
            time.sleep(0.2)
            view = api(cfg, node, "GET", f"/api/v1/pairs/{name}")
    return dict(view)


@app.command()
def create(
    name: str = typer.Argument(..., help="Pair name (also the default volume name)."),
    mode: str = typer.Option("active-active", "--mode",
                             help="Pair mode: active-active; async (journal-based remote "
                                  "copy to a far site); sync (the same, but each write waits "
                                  "until the far site has it); local (a copy on the same node "
                                  "that `pair split` freezes as a point-in-time copy)."),
    primary: str = typer.Option(..., "--primary", help="NODE or NODE:VOLUME of the primary."),
    secondary: str = typer.Option(..., "--secondary",
                                  help="NODE or NODE:VOLUME of the secondary (created if "
                                       "missing, with the primary's size)."),
    group: str = typer.Option(None, "--group",
                              help="async: consistency group (volumes whose far copies keep "
                                   "one write order; default: the pair name)."),
    journal_size: str = typer.Option(None, "--journal-size",
                                     help="async: journal limit of a new group (default 256M); "
                                          "past it the copy falls back to dirty bitmaps."),
    copy_rate: str = typer.Option(None, "--copy-rate",
                                  help="Pace of the copies the primary feeds, in bytes per "
                                       "second (e.g. 100M), leaving room for host I/O; "
                                       "default: unlimited (change it with `pair set`)."),
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Pair two volumes; the secondary takes the primary's identity and gets a full copy."""
    if mode not in ("active-active", "async", "sync", "local"):
        raise UsageError(f"unknown pair mode {mode!r}: use active-active, async, sync or local")
    if mode not in ("async", "sync") and (group or journal_size):
        raise UsageError("--group and --journal-size apply to --mode async or sync only")
    cfg = load_cluster(cluster)
    pnode, pvol = _side(primary, name)
    snode, svol = _side(secondary, name)
    cfg.node(pnode)
    cfg.node(snode)
    if pnode == snode and mode != "local":
        raise CliError("primary and secondary must be on different nodes (a copy on the same "
                       "node is --mode local)")
    if pnode != snode and mode == "local":
        raise CliError("a local pair's primary and secondary are on the same node")
    if mode == "local" and pvol == svol:
        raise CliError("a local pair needs two volumes: --secondary NODE:OTHER-VOLUME")
    body: dict[str, Any] = {"name": name, "mode": mode, "primary_volume": pvol,
                            "secondary": snode, "secondary_volume": svol}
    if group:
        body["group"] = group
    if journal_size:
        body["journal_size"] = journal_size
    if copy_rate:
        body["copy_rate"] = copy_rate
    view = api(cfg, pnode, "POST", "/api/v1/pairs", body)
    if wait:
        view = _wait(cfg, pnode, name, timeout, json_out)
    if json_out:
        emit_json(view)
    else:
        console.print(f"pair [bold]{name}[/]: {pnode}:{pvol} (primary) -> {snode}:{svol}, "
                      f"{view['state']}")


@app.command("list")
def list_(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """List pairs as every reachable node sees them."""
    cfg = load_cluster(cluster)
    rows, unreachable = collect(cfg, "/api/v1/pairs", "pairs")
    if json_out:
        emit_json({"pairs": rows, "unreachable": unreachable})
        return
    table = Table("pair", "node", "role", "volume", "partner", "state", "io mode", "link",
                  "dirty", "lag")
    for r in rows:
        table.add_row(r["name"], r["node"], r["role"], r["volume"], r["partner"], r["state"],
                      r["io_mode"], r["peer_link"], str(r["dirty_chunks"]), _lag(r))
    console.print(table)
    warn_unreachable(unreachable)


def _lag(view: dict[str, Any]) -> str:
    """A remote copy's lag as an operator alerts on it (RPO): seconds, then records."""
    rc = view.get("remote_copy")
    if not rc:
        return ""
    if rc.get("group_state") == "takeover":
        return "taken over"
    lag = rc["lag"]
    text = f"{lag['seconds']:.1f}s {lag['sequences']}w" if lag["sequences"] else "0"
    return f"{text}?" if rc.get("stale") else text


@app.command()
def show(name: str = typer.Argument(...), cluster: str = ClusterOpt,
         json_out: bool = JsonOpt) -> None:
    """Show a pair from both sides."""
    cfg = load_cluster(cluster)
    views = _find(cfg, name)
    if json_out:
        emit_json({"pair": name, "sides": {n: v for n, v in views}})
        return
    for n, v in views:
        table = Table(show_header=False, box=None, title=f"{name} on {n}")
        for key in ("role", "volume", "export_name", "partner", "state", "io_mode", "reason",
                    "peer_link", "dirty_chunks"):
            table.add_row(key, str(v.get(key, "")))
        table.add_row("generation", v["generation"]["current"])
        c = v["copy"]
        if c["running"]:
            table.add_row("copy", f"{c['total_chunks'] - c['remaining_chunks']}/"
                                  f"{c['total_chunks']} chunks, {c['bytes_sent']} bytes sent")
        if v.get("mode") == "local":
            table.add_row("secondary", f"{v['partner_volume']} (I/O mode "
                                       f"{v['secondary_io_mode']}, "
                                       f"{v['secondary_dirty_chunks']} dirty chunks)")
        for sw in v.get("switching", []):
            table.add_row("switched", f"export {sw['host_id']}: {sw['source']} -> "
                                      f"{sw['target']} ({sw['here']} here)")
        rc = v.get("remote_copy")
        if rc:
            sq, lag, j = rc["sequence"], rc["lag"], rc["journal"]
            fed = (f"taken over at {rc['served_at']}: serves hosts, fed by nobody until "
                   "`dr failback`" if rc.get("served_at")
                   else f"fed by {rc['feeder']} to {rc['target']}")
            table.add_row("group", f"{rc['group']} ({rc['group_role']}, {rc['group_state']}, "
                                   f"{fed})")
            if rc.get("reason"):
                table.add_row("group reason", rc["reason"])
            table.add_row("sequence", f"written {sq['written']}  sent {sq['sent']}  received "
                                      f"{sq['received']}  applied {sq['applied']}")
            table.add_row("lag (RPO)", f"{lag['sequences']} writes, {lag['seconds']} s, "
                                       f"{lag['bytes']} bytes")
            table.add_row("journal", f"{rc['journal_mode']}: {j['bytes']} of {j['limit']} "
                                     f"bytes ({j['fill']:.0%}), sequences "
                                     f"{j['first']}..{j['last']}")
        console.print(table)


def _action(name: str, action: str, cluster: str | None, json_out: bool, wait: bool = False,
            timeout: float = 3600.0) -> None:
    cfg = load_cluster(cluster)
    node, _ = _primary(cfg, name)
    view = api(cfg, node, "POST", f"/api/v1/pairs/{name}/{action}")
    if wait:
        view = _wait(cfg, node, name, timeout, json_out)
    if json_out:
        emit_json(view)
        return
    if action == "resync" and not wait:
        console.print(resync_started(name, node, view), highlight=False)
        return
    console.print(f"pair [bold]{name}[/] on {node}: {view['state']}, role {view['role']}, "
                  f"I/O mode {view['io_mode']}")


def resync_started(name: str, node: str, view: dict[str, Any]) -> str:
    """What `pair resync` without --wait says: the copy it started, not the state the pair
    had before (which it keeps until the copy ends)."""
    c = view.get("copy") or {}
    if view["state"] == "mirrored" and not c.get("running"):
        return f"pair {name} on {node}: already mirrored, nothing to copy"
    return (f"pair {name} on {node}: resync started from {c.get('source') or node}, "
            f"{c.get('remaining_chunks', '?')} of {c.get('total_chunks', '?')} chunks to copy; "
            f"the pair reads {view['state']} until the copy ends (follow it with `twinvol pair "
            f"show {name}`, or resync with --wait)")


@app.command()
def split(name: str = typer.Argument(...), cluster: str = ClusterOpt,
          json_out: bool = JsonOpt) -> None:
    """Stop mirroring: the primary continues alone and records what changes."""
    _action(name, "split", cluster, json_out)


@app.command()
def resync(name: str = typer.Argument(...), wait: bool = WaitOpt, timeout: float = TimeoutOpt,
           source: str = typer.Option(None, "--from",
                                      help="Node whose data wins; the other side's changes "
                                           "are discarded (resolves a split brain)."),
           cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Copy what changed to the partner and return to mirrored."""
    if source is None:
        _action(name, "resync", cluster, json_out, wait, timeout)
        return
    cfg = load_cluster(cluster)
    cfg.node(source)
    view = api(cfg, source, "POST", f"/api/v1/pairs/{name}/resync?from={source}")
    if wait:
        view = _wait(cfg, source, name, timeout, json_out)
    if json_out:
        emit_json(view)
    elif wait:
        console.print(f"pair [bold]{name}[/] resynced from {source}: {view['state']}")
    else:
        console.print(resync_started(name, source, view), highlight=False)


@app.command("set")
def set_(name: str = typer.Argument(...),
         copy_rate: str = typer.Option(..., "--copy-rate",
                                       help="Pace of the copies (initial copy, resync, DR "
                                            "catch-up) a node feeds, in bytes per second; 0 "
                                            "for unlimited. A running copy follows at once."),
         node: str = typer.Option(None, "--node",
                                  help="Set it on this node only (default: every node that "
                                       "holds the pair, since either may feed a copy)."),
         cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Change a pair's settings."""
    cfg = load_cluster(cluster)
    if node is not None:
        cfg.node(node)
        nodes = [node]
    else:
        nodes = [n for n, _ in _find(cfg, name)]
    views = {n: api(cfg, n, "PATCH", f"/api/v1/pairs/{name}", {"copy_rate": copy_rate})
             for n in nodes}
    if json_out:
        emit_json({"pair": name, "sides": views})
        return
    for n, v in views.items():
        rate = v.get("copy_rate") or 0
        console.print(f"pair [bold]{name}[/] on {n}: copy rate "
                      f"{f'{rate} bytes/s' if rate else 'unlimited'}")


@app.command()
def swap(name: str = typer.Argument(...), cluster: str = ClusterOpt,
         json_out: bool = JsonOpt) -> None:
    """Exchange the primary and secondary roles of a mirrored pair."""
    _action(name, "swap", cluster, json_out)


@app.command()
def verify(name: str = typer.Argument(...), timeout: float = TimeoutOpt,
           cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Compare both copies by chunk hashes; block and repair the stale side."""
    cfg = load_cluster(cluster)
    node, _ = _primary(cfg, name)
    view = api(cfg, node, "POST", f"/api/v1/pairs/{name}/verify")
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} chunks"),
                  TextColumn("{task.fields[found]}"), console=console, disable=json_out,
                  transient=True) as progress:
        v = view["verify"]
        task = progress.add_task(f"verify {name}", total=max(1, v["total_chunks"]), found="")
        while v["running"]:
            if time.monotonic() > deadline:
                raise CliError(f"verify of {name!r} still running after {timeout:.0f}s")
            time.sleep(0.2)
            v = api(cfg, node, "GET", f"/api/v1/pairs/{name}")["verify"]
            progress.update(task, completed=v["checked_chunks"],
                            found=f"{len(v['mismatched_chunks'])} mismatched")
    if "error" in v:
        raise CliError(f"verify of {name!r} failed: {v['error']}")
    report = {"pair": name, "node": node, "checked_chunks": v["checked_chunks"],
              "skipped_chunks": v.get("skipped_chunks", 0),
              "mismatched_chunks": len(v["mismatched_chunks"]),
              "mismatched_offsets": [c * view["chunk_size"] for c in v["mismatched_chunks"]],
              "latest": v.get("latest"), "stale": v.get("stale"),
              "repaired_chunks": v["repaired_chunks"], "repaired_bytes": v["repaired_bytes"],
              "seconds": v.get("seconds")}
    if json_out:
        emit_json(report)
    elif report["mismatched_chunks"]:
        console.print(f"pair [bold]{name}[/]: {report['mismatched_chunks']} chunk(s) differed; "
                      f"latest copy on {report['latest']}, {report['stale']} was blocked and "
                      f"repaired ({report['repaired_bytes']} bytes)")
    else:
        console.print(f"pair [bold]{name}[/]: {report['checked_chunks']} chunks identical")


@app.command()
def delete(name: str = typer.Argument(...), cluster: str = ClusterOpt,
           json_out: bool = JsonOpt) -> None:
    """Dissolve a pair; the secondary volume gets its own identity back."""
    cfg = load_cluster(cluster)
    node, _ = _primary(cfg, name)
    res = api(cfg, node, "DELETE", f"/api/v1/pairs/{name}")
    if json_out:
        emit_json({**res, "node": node})
    else:
        console.print(f"pair [bold]{name}[/] deleted")
