"""`twinvol token create|list|delete`: named API tokens with a scope (read, operate,
admin). The token is made here, shown once, and only its hash goes to the nodes."""

from __future__ import annotations

import typer
from rich.table import Table

from twinvol.access import Scope, hash_token, new_token
from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    api,
    collect,
    console,
    emit_json,
    load_cluster,
    warn_unreachable,
)

app = typer.Typer(help="API tokens with scopes (read, operate, admin).", no_args_is_help=True)

NameArg = typer.Argument(..., help="Token name (shown in the audit log).")
ScopeOpt = typer.Option(..., "--scope", help="read, operate or admin.")


@app.command("create")
def create(name: str = NameArg, scope: Scope = ScopeOpt, cluster: str = ClusterOpt,
           json_out: bool = JsonOpt) -> None:
    """Make a token and register its hash on every node; prints the token once."""
    cfg = load_cluster(cluster)
    token = new_token()
    body = {"name": name, "scope": scope.value, "hash": hash_token(token)}
    for n in cfg.nodes:
        api(cfg, n, "POST", "/api/v1/tokens", body)
    if json_out:
        emit_json({"name": name, "scope": scope.value, "token": token,
                   "nodes": sorted(cfg.nodes)})
    else:
        console.print(f"token {name} ({scope.value}) on {len(cfg.nodes)} node(s); it is shown "
                      "only now:", highlight=False)
        print(token)


@app.command("list")
def list_tokens(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Tokens known to each node (names and scopes, never the tokens)."""
    cfg = load_cluster(cluster)
    rows: list[dict[str, object]] = []
    unreachable: dict[str, str] = {}
    for n in cfg.nodes:
        try:
            got, _ = collect(cfg, "/api/v1/tokens", "tokens", only=n)
        except ApiError:
            raise
        except CliError as e:
            unreachable[n] = str(e)
            continue
        rows += [{**t, "node": n} for t in got]
    if json_out:
        emit_json({"tokens": rows})
        return
    table = Table("NODE", "NAME", "SCOPE")
    for r in rows:
        table.add_row(str(r["node"]), str(r["name"]), str(r["scope"]))
    console.print(table)
    warn_unreachable(unreachable)


@app.command("delete")
def delete(name: str = NameArg, cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Remove a token from every node."""
    cfg = load_cluster(cluster)
    for n in cfg.nodes:
        api(cfg, n, "DELETE", f"/api/v1/tokens/{name}")
    if json_out:
        emit_json({"deleted": name, "nodes": sorted(cfg.nodes)})
    else:
        console.print(f"token {name} deleted on {len(cfg.nodes)} node(s)", highlight=False)
