"""`twinvol volume create|list|show|resize|delete`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    NodeOpt,
    UsageError,
    api,
    cli_size,
    collect,
    console,
    emit_json,
    load_cluster,
    warn_unreachable,
)
from twinvol.cluster import ClusterConfig
from twinvol.sizes import format_size

app = typer.Typer(help="Create and manage volumes on storage nodes.", no_args_is_help=True)


def _done(says: str) -> str:
    """'create a new file ...' -> 'created a new file ...' (the node says what it does)."""
    for verb, past in (("create ", "created "), ("use ", "using ")):
        if says.startswith(verb):
            return past + says[len(verb):]
    return says


def _locate(cfg: ClusterConfig, name: str, node: str | None) -> str:
    """The node that holds volume `name` (the one given, or the only one that has it)."""
    if node is not None:
        cfg.node(node)
        return node
    found: list[str] = []
    unreachable: list[str] = []
    for n in cfg.nodes:
        try:
            api(cfg, n, "GET", f"/api/v1/volumes/{name}", timeout=5)
            found.append(n)
        except ApiError as e:
            if e.status != 404:
                raise
        except CliError:
            unreachable.append(n)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CliError(f"volume {name!r} exists on nodes {', '.join(found)}; choose one "
                       "with --node")
    extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
    raise CliError(f"volume {name!r} does not exist on any node{extra}")


def _print_volume(v: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("name", "node", "site", "id", "export_name", "nbd_uri", "kind", "path",
                "description", "read_only", "connections"):
        table.add_row(key, str(v.get(key, "")))
    table.add_row("size", f"{format_size(v['size'])} ({v['size']} bytes)")
    if v.get("allocated") is not None:
        table.add_row("allocated", format_size(v["allocated"]))
    vi = v["virtual_identity"]
    table.add_row("virtual identity", f"serial {vi['serial']}, volume id {vi['volume_id']}")
    console.print(table)


@app.command()
def create(
    name: str = typer.Argument(..., help="Volume name."),
    size: str = typer.Option(None, "--size", "-s", help="Size, e.g. 1G (optional with --path)."),
    node: str = NodeOpt,
    path: str = typer.Option(None, "--path",
                             help="Backing file or block device. A path that does not exist "
                                  "is created; an existing one is refused unless --adopt."),
    adopt: bool = typer.Option(False, "--adopt",
                               help="Use the existing file or device at --path: its contents "
                                    "become the volume's (grown to --size if that is larger)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Only check and say what would be done."),
    export_name: str = typer.Option(None, "--export-name", help="NBD export name (default: NAME)."),
    description: str = typer.Option("", "--description", help="Description shown to NBD clients."),
    read_only: bool = typer.Option(False, "--read-only", help="Export read-only."),
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a volume (thin by default) on a node (default: the first in the cluster file)."""
    cfg = load_cluster(cluster)
    target = node or next(iter(cfg.nodes))
    cfg.node(target)
    body: dict[str, Any] = {"name": name, "description": description, "read_only": read_only}
    if size is not None:
        body["size"] = cli_size(size)
    if path is not None:
        body["path"] = path
    if export_name is not None:
        body["export_name"] = export_name
    if adopt:
        if path is None:
            raise UsageError("--adopt needs --path (the file or device to adopt)")
        body["adopt"] = True
    if dry_run:
        body["dry_run"] = True
    vol = api(cfg, target, "POST", "/api/v1/volumes", body)
    if json_out:
        emit_json(vol)
    elif dry_run:
        console.print(f"dry run: node {vol['node']} would {vol['says']} for volume "
                      f"[bold]{vol['name']}[/] ({format_size(vol['size'])}); nothing was done",
                      highlight=False)
    else:
        console.print(f"created volume [bold]{vol['name']}[/] on node {vol['node']}: "
                      f"{format_size(vol['size'])}, {vol['nbd_uri']}", highlight=False)
        if path is not None and vol.get("says"):
            console.print(f"  backing: {_done(vol['says'])}", highlight=False)


@app.command("list")
def list_(
    node: str = NodeOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List volumes on every node (or one node)."""
    cfg = load_cluster(cluster)
    vols, unreachable = collect(cfg, "/api/v1/volumes", "volumes", node)
    if json_out:
        emit_json({"volumes": vols, "unreachable": unreachable})
        return
    table = Table("name", "node", "size", "export", "kind", "conns", "nbd uri")
    for v in vols:
        table.add_row(v["name"], v["node"], format_size(v["size"]), v["export_name"], v["kind"],
                      str(v["connections"]), v["nbd_uri"])
    console.print(table)
    warn_unreachable(unreachable)


@app.command()
def show(
    name: str = typer.Argument(..., help="Volume name."),
    node: str = NodeOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show one volume."""
    cfg = load_cluster(cluster)
    target = _locate(cfg, name, node)
    vol = api(cfg, target, "GET", f"/api/v1/volumes/{name}")
    if json_out:
        emit_json(vol)
    else:
        _print_volume(vol)


@app.command()
def resize(
    name: str = typer.Argument(..., help="Volume name."),
    size: str = typer.Option(..., "--size", "-s", help="New size (grow only), e.g. 2G."),
    node: str = NodeOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Grow a volume. Connected NBD clients see the new size when they reconnect."""
    cfg = load_cluster(cluster)
    new_size = cli_size(size)
    target = _locate(cfg, name, node)
    vol = api(cfg, target, "POST", f"/api/v1/volumes/{name}/resize", {"size": new_size})
    if json_out:
        emit_json(vol)
    else:
        console.print(f"volume [bold]{name}[/] on node {target} is now {format_size(vol['size'])}")


@app.command()
def delete(
    name: str = typer.Argument(..., help="Volume name."),
    node: str = NodeOpt,
    force: bool = typer.Option(False, "--force", help="Disconnect NBD clients first."),
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Delete a volume. Thin backing files are removed; given files and devices are kept."""
    cfg = load_cluster(cluster)
    target = _locate(cfg, name, node)
    q = "?force=1" if force else ""
    res = api(cfg, target, "DELETE", f"/api/v1/volumes/{name}{q}")
    if json_out:
        emit_json({**res, "node": target})
    else:
        console.print(f"deleted volume [bold]{name}[/] on node {target}")
