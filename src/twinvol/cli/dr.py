"""`twinvol dr takeover|failback`: disaster recovery of remote copies at a surviving site."""

from __future__ import annotations

from typing import Any

import typer

from twinvol.cli.common import CliError, ClusterOpt, JsonOpt, api, console, emit_json, load_cluster

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
            console.print(f"group [bold]{r['group']}[/]: node {r['node']} serves hosts at "
                          f"sequence {rp['sequence']}; lost {lost['sequences']} write(s) "
                          f"({lost['seconds']} s) after it")
        else:
            console.print(f"group [bold]{r['group']}[/]: {r.get('reason', r['action'])}")
    for err in errors:
        console.print(f"[yellow]warning:[/] {err}")
