"""`twinvol dr takeover|failback`: disaster recovery of remote copies at a surviving site."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn

from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    api,
    console,
    emit_json,
    load_cluster,
)

app = typer.Typer(help="Disaster recovery of async remote copies.", no_args_is_help=True)


def _site_nodes(cfg: Any, site: str) -> list[str]:
    nodes = [n for n, nc in cfg.nodes.items() if nc.site == site]
    if not nodes:
        sites = sorted({nc.site for nc in cfg.nodes.values()})
        raise CliError(f"no node is at site {site!r} (sites: {', '.join(sites)})")
    return nodes


@app.command()
def takeover(
    site: str = typer.Option(..., "--site", help="The surviving site where recovery runs."),
    force: bool = typer.Option(False, "--force",
                               help="Take over even though the current feeder still answers, "
                                    "or serve an inconsistent far copy."),
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Recover every remote copy held at SITE: a standby site takes over feeding the far
    copy with only what it lacks; the far site itself serves hosts at its last
    consistent point. Reports the recovery point and what was (or will be) copied."""
    cfg = load_cluster(cluster)
    reports: list[dict[str, Any]] = []
    errors: list[str] = []
    for node in _site_nodes(cfg, site):
        try:
            res = api(cfg, node, "POST", "/api/v1/dr/takeover", {"force": force})
        except CliError as e:
            errors.append(str(e))
            continue
        reports += res["groups"]
    if not reports:
        raise CliError("; ".join(errors) or f"nothing to take over at site {site}")
    if json_out:
        emit_json({"site": site, "groups": reports, "errors": errors})
        return
    for r in reports:
        if r["action"] == "feed":
            what = (f"{r['records']} journal record(s), {r['bytes']} bytes"
                    if r["method"] == "journal" else
                    f"{r['chunks']} dirty chunk(s), {r['bytes']} bytes"
                    + (" (a full copy)" if r["full_copy"] else ""))
            console.print(f"group [bold]{r['group']}[/]: node {r['node']} now feeds "
                          f"{r['target']} (was {r['previous_feeder']}); the far copy had "
                          f"sequence {r['target_received']}; delta resync sends {what}")
        elif r["action"] == "serve":
            rp, lost = r["recovery_point"], r["lost"]
            known = lost.get("known_until")
            since = (f" as the feeder last reported at "
                     f"{time.strftime('%H:%M:%S', time.gmtime(known))}Z; later writes are "
                     "unknown here, the failback report counts them") if known else ""
            console.print(f"group [bold]{r['group']}[/]: node {r['node']} serves hosts at "
                          f"sequence {rp['sequence']}; lost at least {lost['sequences']} "
                          f"write(s) ({lost['seconds']} s) after it{since}")
        else:
            console.print(f"group [bold]{r['group']}[/]: {r.get('reason', r['action'])}")
    for err in errors:
        console.print(f"[yellow]warning:[/] {err}")


@app.command()
def failback(
    site: str = typer.Option(None, "--site",
                             help="Site of the original primary (default: every node that "
                                  "has a taken-over far copy)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up waiting after this long."),
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Return the original direction after a far-site takeover: the far copy stops serving,
    sends back only the chunks that differ (its changes since the takeover and the
    original primary's writes after the recovery point), and copying resumes from the
    original primary."""
    cfg = load_cluster(cluster)
    nodes = _site_nodes(cfg, site) if site else list(cfg.nodes)
    started: list[tuple[str, dict[str, Any]]] = []
    errors: list[str] = []
    for node in nodes:
        try:
            res = api(cfg, node, "POST", "/api/v1/dr/failback", {}, timeout=60)
        except ApiError as e:
            if e.status != 404 or site:
                errors.append(str(e))
            continue
        except CliError as e:
            if site:
                errors.append(str(e))
            continue
        started += [(node, r) for r in res["groups"]]
    if not started:
        raise CliError("; ".join(errors) or "no taken-over far copy to fail back")
    total = max(1, sum(r["chunks"] for _, r in started))
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("[bold]failback"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} chunks"), console=console,
                  disable=json_out, transient=True) as progress:
        task = progress.add_task("failback", total=total)
        while True:
            remaining = 0
            for node, r in started:
                pairs = api(cfg, node, "GET", "/api/v1/pairs")["pairs"]
                for p in pairs:
                    rc = p.get("remote_copy") or {}
                    if rc.get("group") != r["group"]:
                        continue
                    if rc.get("group_state") == "suspended":
                        raise CliError(f"failback of group {r['group']!r} stopped: "
                                       f"{p.get('reason') or 'suspended'}")
                    if rc.get("group_state") != "mirrored":
                        remaining += 1
            progress.update(task, completed=total if not remaining else 0)
            if not remaining:
                break
            if time.monotonic() > deadline:
                raise CliError(f"failback still running after {timeout:.0f}s")
            time.sleep(0.2)
    reports = [r for _, r in started]
    if json_out:
        emit_json({"groups": reports, "errors": errors})
        return
    for r in reports:
        console.print(f"group [bold]{r['group']}[/]: back on {r['node']} from {r['from']}; "
                      f"copied {r['chunks']} chunk(s), {r['bytes']} bytes (recovery point "
                      f"{r['recovery_point']})")
