"""`twinvol config check`: is the cluster file right, and does every node in it answer as
itself? Run it after editing the file and before blaming the cluster."""

from __future__ import annotations

from typing import Any

import typer

from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    WrongNode,
    api,
    console,
    emit_json,
)
from twinvol.cluster import ClusterError
from twinvol.cluster import load as load_file

app = typer.Typer(help="Check the cluster file.", no_args_is_help=True)


def _probe(cfg: Any, name: str) -> dict[str, Any]:
    """One node: "ok" with its pid and version, or the problem in one sentence."""
    try:
        st = api(cfg, name, "GET", "/api/v1/node", timeout=5)
    except WrongNode as e:
        return {"state": "wrong_node", "problem": str(e)}
    except ApiError as e:
        return {"state": "error", "problem": str(e)}
    except CliError as e:
        return {"state": "unreachable", "problem": str(e)}
    if st.get("node") != name:  # an older node without the identity header
        return {"state": "wrong_node",
                "problem": f"node {name}'s address is answered by node {st.get('node')}"}
    if st.get("site") != cfg.node(name).site:
        return {"state": "wrong_site", "problem": f"node {name} says it is in site "
                f"{st.get('site')}, the file says {cfg.node(name).site}"}
    return {"state": "ok", "pid": st.get("pid"), "version": st.get("version")}


@app.command()
def check(cluster: str = ClusterOpt, json_out: bool = JsonOpt,
          offline: bool = typer.Option(False, "--offline",
                                       help="Only check the file; do not contact the nodes.")
          ) -> None:
    """Validate the cluster file (unknown keys with table and line, duplicate addresses)
    and ask every node whether it is the one the file means. Exit 0 when all is right."""
    try:
        cfg = load_file(cluster)
    except ClusterError as e:
        if json_out:
            emit_json({"ok": False, "file": cluster, "error": str(e), "nodes": {}})
            raise typer.Exit(1) from None
        raise CliError(str(e)) from None
    nodes = {} if offline else {n: _probe(cfg, n) for n in cfg.nodes}
    ok = all(v["state"] == "ok" for v in nodes.values())
    if json_out:
        emit_json({"ok": ok, "file": cfg.path, "error": None, "nodes": nodes})
    else:
        console.print(f"cluster file {cfg.path}: valid ({len(cfg.nodes)} nodes, "
                      f"{len(cfg.vmhosts)} hypervisor hosts)", highlight=False)
        for n, v in nodes.items():
            if v["state"] == "ok":
                console.print(f"  node {n}: [green]ok[/] (pid {v['pid']}, {v['version']})",
                              highlight=False)
            else:
                console.print(f"  node {n}: [red]{v['state']}[/]: {v['problem']}",
                              highlight=False)
    if not ok:
        raise typer.Exit(1)
