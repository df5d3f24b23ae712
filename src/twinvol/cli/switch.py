"""`twinvol switch HOST-VOLUME --to TARGET | --back`, `twinvol switch list`.

The command comes from the host: with a `[host]` table it goes to the host agent, which
carries it to a storage node; `--node N` sends it to node N directly (a host without an
agent). `list` reads the table from every reachable node.
"""

from __future__ import annotations

import json
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
    collect,
    console,
    emit_json,
    load_cluster,
    warn_unreachable,
)
from twinvol.cluster import ClusterConfig


def _agent(cfg: ClusterConfig, body: dict[str, Any]) -> dict[str, Any]:
    assert cfg.host is not None
    url = cfg.service_url(str(cfg.host["api"])) + "/api/v1/switch"
    headers = {"Content-Type": "application/json", **auth_headers(cfg)}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code} {e.reason}"
        raise CliError(f"host agent: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"host agent ({url}) is not reachable: {getattr(e, 'reason', e)}; is "
                       "it running (`twinvol host run`)? Use --node N to ask a node "
                       "directly") from None


def switch(
    host_volume: str = typer.Argument(..., metavar="HOST-VOLUME|list",
                                      help="The export name the host uses, or `list`."),
    to: str = typer.Option(None, "--to", metavar="TARGET-ID",
                           help="Target: NODE:VOLUME, VOLUME or a volume id; it must be a "
                                "pair partner of the host's volume."),
    back: bool = typer.Option(False, "--back", help="Serve the host from its source again."),
    node: str = NodeOpt,
    cluster: str = ClusterOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Switch a host's volume to a pair partner, on its open connections (switching table)."""
    cfg = load_cluster(cluster)
    if host_volume == "list":
        if to or back:
            raise CliError("`switch list` takes no --to or --back")
        _list(cfg, node, json_out)
        return
    if bool(to) == back:
        raise CliError("give either --to TARGET-ID or --back", 2)
    if node is not None:
        cfg.node(node)
        if back:
            res = api(cfg, node, "POST", "/api/v1/switching/back", {"host_id": host_volume},
                      timeout=60)
        else:
            res = api(cfg, node, "POST", "/api/v1/switching", {"host_id": host_volume,
                                                               "to": to}, timeout=60)
    elif cfg.host is not None:
        res = _agent(cfg, {"export": host_volume, "back": True} if back
                     else {"export": host_volume, "to": to})
    else:
        first = next(iter(cfg.nodes))
        res = api(cfg, first, "POST", "/api/v1/switching/back" if back
                  else "/api/v1/switching", {"host_id": host_volume, "to": to or ""},
                  timeout=60)
    if json_out:
        emit_json(res)
    elif back:
        console.print(f"export [bold]{host_volume}[/] is served from {res['source']} again "
                      f"(was switched to {res['target']})", highlight=False)
    else:
        console.print(f"export [bold]{host_volume}[/] switched: {res['source']} -> "
                      f"{res['target']} ({res['mode']} pair {res['pair']}; table on "
                      f"{', '.join(res['nodes'])})", highlight=False)


def _list(cfg: ClusterConfig, node: str | None, json_out: bool) -> None:
    rows, unreachable = collect(cfg, "/api/v1/switching", "entries", node)
    if json_out:
        emit_json({"entries": rows, "unreachable": unreachable})
        return
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:  # every node holding an entry reports it: show it once
        seen.setdefault((r["host_id"], r["version"]), r)
    table = Table("host id (export)", "source", "target", "pair", "mode", "since", "nodes")
    for _, r in sorted(seen.items()):
        table.add_row(r["host_id"], r["source"], r["target"], r["pair"], r["mode"],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["switched_at"])),
                      ", ".join(r["nodes"]))
    console.print(table)
    warn_unreachable(unreachable)
