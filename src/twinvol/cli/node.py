"""`twinvol node run|status`."""

from __future__ import annotations

import typer
from rich.table import Table

from twinvol import logs, sdnotify
from twinvol.cli.common import (
    CliError,
    ClusterOpt,
    JsonOpt,
    NodeOpt,
    api,
    console,
    emit_json,
    load_cluster,
)
from twinvol.cluster import ClusterError
from twinvol.sizes import human_size
from twinvol.storage.catalog import CatalogError

app = typer.Typer(help="Run and inspect storage nodes.", no_args_is_help=True)


@app.command()
def run(
    node: str = typer.Option(..., "--node", "-n", help="Node name from the cluster file."),
    cluster: str = ClusterOpt,
) -> None:
    """Run a storage node in the foreground (stops on SIGTERM/SIGINT)."""
    from twinvol.node.daemon import NodeStartError
    from twinvol.node.daemon import run as run_node

    cfg = load_cluster(cluster)
    try:
        cfg.node(node)
    except ClusterError as e:
        raise CliError(str(e)) from None
    logs.setup(f"node-{node}")
    sdnotify.ready_when_answering(cfg.node(node).api_url + "/api/v1/health",
                                  what=f"node {node}")
    try:
        run_node(cfg, node)
    except (NodeStartError, CatalogError) as e:
        raise CliError(f"node {node} cannot start: {e}") from None


@app.command()
def status(
    node: str = NodeOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show the status of every node (or one)."""
    cfg = load_cluster(cluster)
    names = [node] if node else list(cfg.nodes)
    out: dict[str, object] = {}
    for n in names:
        cfg.node(n)
        try:
            out[n] = api(cfg, n, "GET", "/api/v1/node", timeout=5)
        except CliError as e:
            if node:
                raise
            out[n] = {"node": n, "error": str(e)}
    down = [n for n, s in out.items() if isinstance(s, dict) and "error" in s]
    if json_out:
        emit_json({"nodes": out})
    else:
        table = Table("node", "site", "state", "pid", "nbd", "api", "volumes", "conns", "free")
        for n, s in out.items():
            assert isinstance(s, dict)
            if "error" in s:
                table.add_row(n, cfg.node(n).site, "[red]down[/]", "-", "-",
                              cfg.node(n).api_url, "-", "-", "-")
            else:
                table.add_row(n, s["site"], "[green]up[/]", str(s["pid"]), s["nbd"], s["api"],
                              str(s["volumes"]), str(s["connections"]),
                              human_size(s["capacity"]["free"]))
        console.print(table)
        for n in down:
            console.print(f"[red]node {n} is down:[/] {out[n]['error']}",  # type: ignore[index]
                          highlight=False)
    if down:
        raise typer.Exit(1)  # monitoring can tell: a node that does not answer is not "ok"
